#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The scheduler store against real redb files in temporary directories.

use std::collections::BTreeMap;
use std::path::PathBuf;

use messages::UserId;
use scheduler::store::{
    AgentRecord, AgentState, Expired, Heartbeat, Ingest, LabelSelector, NewResult, ResultBody,
    Store, StoreError, StoreOptions, TargetState, Targets, TaskKind, TaskSpec,
};
use serde_json::json;

fn node(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> LabelSelector {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn agent(id: &str, pairs: &[(&str, &str)], at: u64) -> AgentRecord {
    AgentRecord {
        node_id: node(id),
        hostname: format!("{id}.example"),
        version: "0.1.0".into(),
        labels: labels(pairs),
        addresses: vec!["10.0.0.1".into()],
        registered_at_ms: at,
        last_seen_ms: at,
        state: AgentState::Online,
        via: None,
    }
}

fn command_spec(targets: Targets, timeout_ms: u64, max_attempts: u32) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Command {
            argv: vec!["uptime".into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 1_000,
        },
        targets,
        timeout_ms,
        max_attempts,
        traceparent: None,
    }
}

fn ok_result(at: u64) -> ResultBody {
    ResultBody {
        exit_code: Some(0),
        stdout_tail: "up 3 days".into(),
        stderr_tail: String::new(),
        error: None,
        latency_ms: None,
        finished_at_ms: at,
        output_chunks: 0,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    store: Store,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state").join("scheduler.redb");
    let store = Store::open(&path).unwrap();
    Fixture {
        _dir: dir,
        path,
        store,
    }
}

/// Three agents: two in eu (one of them gpu), one in us.
fn with_fleet(s: &Store) {
    s.upsert_agent(&agent("n1", &[("region", "eu"), ("gpu", "yes")], 1_000))
        .unwrap();
    s.upsert_agent(&agent("n2", &[("region", "eu")], 1_000))
        .unwrap();
    s.upsert_agent(&agent("n3", &[("region", "us")], 1_000))
        .unwrap();
}

fn state_of(s: &Store, task: u64, n: &str) -> TargetState {
    s.task(task).unwrap().unwrap().targets[&node(n)].state
}

#[test]
fn agent_upsert_touch_and_selectors() {
    let f = fixture();
    let s = &f.store;
    assert_eq!(
        s.upsert_agent(&agent("n1", &[("region", "eu")], 1_000))
            .unwrap(),
        None
    );
    // Re-register replaces the record and reports the previous state.
    let mut again = agent("n1", &[("region", "eu"), ("gpu", "yes")], 1_500);
    again.version = "0.2.0".into();
    assert_eq!(s.upsert_agent(&again).unwrap(), Some(AgentState::Online));
    with_fleet(s);
    assert_eq!(s.counts().unwrap().agents, 3);

    // Heartbeats: degraded, then healthy again; an older heartbeat is ignored.
    assert_eq!(
        s.touch(&node("n2"), 2_000, true).unwrap(),
        Some(AgentState::Online)
    );
    assert_eq!(s.touch(&node("n2"), 2_500, true).unwrap(), None);
    assert_eq!(s.touch(&node("n2"), 2_400, false).unwrap(), None);
    let n2 = s.agent(&node("n2")).unwrap().unwrap();
    assert_eq!((n2.last_seen_ms, n2.state), (2_500, AgentState::Degraded));
    assert_eq!(
        s.touch(&node("n2"), 3_000, false).unwrap(),
        Some(AgentState::Degraded)
    );
    assert!(matches!(
        s.touch(&node("ghost"), 3_000, false),
        Err(StoreError::UnknownAgent(_))
    ));
    assert_eq!(s.agent(&node("ghost")).unwrap(), None);

    // Batched heartbeats: one change, one unknown.
    let out = s
        .touch_many(&[
            Heartbeat {
                node_id: node("n1"),
                at_ms: 3_000,
                degraded: false,
            },
            Heartbeat {
                node_id: node("n3"),
                at_ms: 3_000,
                degraded: true,
            },
            Heartbeat {
                node_id: node("ghost"),
                at_ms: 3_000,
                degraded: false,
            },
        ])
        .unwrap();
    assert_eq!(
        out.changes,
        vec![(node("n3"), AgentState::Online, AgentState::Degraded)]
    );
    assert_eq!(out.unknown, vec![node("ghost")]);

    let ids = |v: Vec<AgentRecord>| {
        v.into_iter()
            .map(|a| a.node_id.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(s.agents(&LabelSelector::new(), None).unwrap()),
        ["n1", "n2", "n3"]
    );
    assert_eq!(
        ids(s.agents(&labels(&[("region", "eu")]), None).unwrap()),
        ["n1", "n2"]
    );
    assert_eq!(
        ids(s
            .agents(&labels(&[("region", "eu"), ("gpu", "yes")]), None)
            .unwrap()),
        ["n1"]
    );
    assert_eq!(
        ids(s.agents(&labels(&[("region", "ap")]), None).unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(s
            .agents(&LabelSelector::new(), Some(AgentState::Degraded))
            .unwrap()),
        ["n3"]
    );
    assert_eq!(s.agent(&node("n1")).unwrap().unwrap().version, "0.1.0");
}

#[test]
fn offline_marking_returns_only_changes() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s); // all last seen at 1_000
    s.touch(&node("n1"), 5_000, false).unwrap();
    s.touch(&node("n2"), 2_000, true).unwrap();

    let changed = s.mark_offline_before(4_000).unwrap();
    assert_eq!(
        changed,
        vec![
            (node("n2"), AgentState::Degraded),
            (node("n3"), AgentState::Online)
        ]
    );
    // Already offline: not reported again.
    assert_eq!(s.mark_offline_before(4_000).unwrap(), vec![]);
    assert_eq!(
        s.agent(&node("n3")).unwrap().unwrap().state,
        AgentState::Offline
    );
    assert_eq!(
        s.agent(&node("n1")).unwrap().unwrap().state,
        AgentState::Online
    );
    // Coming back is a change the heartbeat reports.
    assert_eq!(
        s.touch(&node("n3"), 6_000, false).unwrap(),
        Some(AgentState::Offline)
    );
}

#[test]
fn task_creation_by_ids_and_by_selector() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);

    let a = s
        .create_task(
            &command_spec(
                Targets::Nodes(vec![node("n3"), node("n1"), node("n3")]),
                100,
                1,
            ),
            10_000,
        )
        .unwrap();
    let b = s
        .create_task(
            &command_spec(Targets::Selector(labels(&[("region", "eu")])), 100, 1),
            10_001,
        )
        .unwrap();
    assert!(b > a, "ids are monotonic");

    let ta = s.task(a).unwrap().unwrap();
    assert_eq!(ta.created_at_ms, 10_000);
    assert_eq!(
        ta.targets.keys().cloned().collect::<Vec<_>>(),
        vec![node("n1"), node("n3")]
    );
    assert!(
        ta.targets
            .values()
            .all(|t| t.state == TargetState::Pending && t.attempts == 0)
    );
    let tb = s.task(b).unwrap().unwrap();
    assert_eq!(
        tb.targets.keys().cloned().collect::<Vec<_>>(),
        vec![node("n1"), node("n2")]
    );

    // Bad input stores nothing.
    let before = s.counts().unwrap();
    assert!(matches!(
        s.create_task(
            &command_spec(Targets::Nodes(vec![node("ghost")]), 100, 1),
            0
        ),
        Err(StoreError::UnknownAgent(_))
    ));
    assert!(matches!(
        s.create_task(
            &command_spec(Targets::Selector(labels(&[("region", "ap")])), 100, 1),
            0
        ),
        Err(StoreError::NoTargets)
    ));
    assert!(matches!(
        s.create_task(
            &command_spec(Targets::Selector(LabelSelector::new()), 100, 1),
            0
        ),
        Err(StoreError::InvalidSpec(_))
    ));
    assert!(matches!(
        s.create_task(&command_spec(Targets::Nodes(vec![node("n1")]), 100, 0), 0),
        Err(StoreError::InvalidSpec(_))
    ));
    let mut empty_argv = command_spec(Targets::Nodes(vec![node("n1")]), 100, 1);
    empty_argv.kind = TaskKind::Command {
        argv: vec![],
        env: BTreeMap::new(),
        cwd: None,
        timeout_ms: 1,
    };
    assert!(matches!(
        s.create_task(&empty_argv, 0),
        Err(StoreError::InvalidSpec(_))
    ));
    assert_eq!(s.counts().unwrap(), before);
    assert_eq!(s.task(9_999).unwrap(), None);

    // Listing: newest first, limit, state filter.
    let all = s.tasks(10, None).unwrap();
    assert_eq!(all.iter().map(|t| t.id).collect::<Vec<_>>(), vec![b, a]);
    assert_eq!(all[0].states[&TargetState::Pending], 2);
    assert_eq!(s.tasks(1, None).unwrap().len(), 1);
    s.mark_dispatched(a, &node("n1"), 10_100).unwrap();
    let dispatched = s.tasks(10, Some(TargetState::Dispatched)).unwrap();
    assert_eq!(dispatched.iter().map(|t| t.id).collect::<Vec<_>>(), vec![a]);
    assert!(!dispatched[0].is_finished());

    // Ids keep increasing after a restart.
    drop(f.store);
    let s = Store::open(&f.path).unwrap();
    let c = s
        .create_task(&command_spec(Targets::Nodes(vec![node("n2")]), 100, 1), 0)
        .unwrap();
    assert!(c > b);
}

#[test]
fn every_legal_transition_and_illegal_ones() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);
    let all = Targets::Nodes(vec![node("n1"), node("n2"), node("n3")]);
    let n1 = node("n1");
    let n2 = node("n2");
    let n3 = node("n3");

    // Pending -> Dispatched -> Running -> Succeeded (n1)
    // Pending -> Dispatched -> Running -> Failed    (n2)
    // Pending -> Cancelled                          (n3)
    let t = s
        .create_task(&command_spec(all.clone(), 1_000, 1), 0)
        .unwrap();
    s.mark_dispatched(t, &n1, 10).unwrap();
    let st = &s.task(t).unwrap().unwrap().targets[&n1];
    assert_eq!(
        (st.state, st.attempts, st.dispatched_at_ms, st.deadline_ms),
        (TargetState::Dispatched, 1, Some(10), Some(1_010))
    );
    s.mark_running(t, &n1, 20).unwrap();
    assert_eq!(state_of(s, t, "n1"), TargetState::Running);
    assert_eq!(
        s.record_result("m1", t, &n1, &ok_result(30)).unwrap(),
        Ingest::New
    );
    assert_eq!(state_of(s, t, "n1"), TargetState::Succeeded);
    s.mark_dispatched(t, &n2, 10).unwrap();
    s.mark_running(t, &n2, 20).unwrap();
    let mut failed = ok_result(40);
    failed.exit_code = Some(3);
    s.record_result("m2", t, &n2, &failed).unwrap();
    assert_eq!(state_of(s, t, "n2"), TargetState::Failed);
    assert_eq!(s.cancel_target(t, &n3, 50).unwrap(), TargetState::Pending);
    assert_eq!(state_of(s, t, "n3"), TargetState::Cancelled);
    let summary = &s.tasks(1, None).unwrap()[0];
    assert!(summary.is_finished());
    assert_eq!(
        s.task(t).unwrap().unwrap().targets[&n1].result,
        Some(ok_result(30))
    );

    // Dispatched -> Succeeded (running ack lost), Dispatched -> Cancelled,
    // Running -> Cancelled.
    let u = s
        .create_task(&command_spec(all.clone(), 1_000, 1), 0)
        .unwrap();
    s.mark_dispatched(u, &n1, 10).unwrap();
    s.record_result("m3", u, &n1, &ok_result(15)).unwrap();
    assert_eq!(state_of(s, u, "n1"), TargetState::Succeeded);
    s.mark_dispatched(u, &n2, 10).unwrap();
    s.mark_dispatched(u, &n3, 10).unwrap();
    s.mark_running(u, &n3, 11).unwrap();
    let cancelled = s.cancel(u, 20).unwrap();
    assert_eq!(
        cancelled,
        vec![
            (n2.clone(), TargetState::Dispatched),
            (n3.clone(), TargetState::Running)
        ]
    );
    assert_eq!(state_of(s, u, "n2"), TargetState::Cancelled);
    assert_eq!(state_of(s, u, "n3"), TargetState::Cancelled);
    assert_eq!(s.cancel(u, 30).unwrap(), vec![], "nothing left to cancel");
    // Cancelled targets are no longer pending or in flight.
    assert!(s.expire_dispatched_before(u64::MAX).unwrap().is_empty());

    // Illegal transitions are typed errors and change nothing.
    let err = |r: Result<(), StoreError>| match r {
        Err(StoreError::InvalidTransition { from, to, .. }) => (from, to),
        other => panic!("expected InvalidTransition, got {other:?}"),
    };
    let v = s.create_task(&command_spec(all, 1_000, 1), 0).unwrap();
    assert_eq!(
        err(s.mark_running(v, &n1, 1)),
        (TargetState::Pending, TargetState::Running)
    );
    s.mark_dispatched(v, &n1, 1).unwrap();
    assert_eq!(
        err(s.mark_dispatched(v, &n1, 2)),
        (TargetState::Dispatched, TargetState::Dispatched)
    );
    assert_eq!(
        err(s.mark_dispatched(t, &n1, 2)),
        (TargetState::Succeeded, TargetState::Dispatched)
    );
    assert_eq!(
        err(s.mark_running(t, &n3, 2)),
        (TargetState::Cancelled, TargetState::Running)
    );
    assert!(matches!(
        s.cancel_target(t, &n1, 3),
        Err(StoreError::InvalidTransition {
            from: TargetState::Succeeded,
            to: TargetState::Cancelled,
            ..
        })
    ));
    assert_eq!(state_of(s, t, "n1"), TargetState::Succeeded);
    assert_eq!(state_of(s, v, "n1"), TargetState::Dispatched);
    assert!(matches!(
        s.mark_dispatched(999, &n1, 1),
        Err(StoreError::UnknownTask(999))
    ));
    s.upsert_agent(&agent("n4", &[], 0)).unwrap();
    assert!(matches!(
        s.mark_dispatched(v, &node("n4"), 1),
        Err(StoreError::NotATarget { .. })
    ));
}

#[test]
fn pending_for_an_agent_that_comes_back() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);
    // n3 goes offline; tasks for it are created meanwhile.
    s.touch(&node("n1"), 10_000, false).unwrap();
    s.touch(&node("n2"), 10_000, false).unwrap();
    assert_eq!(
        s.mark_offline_before(5_000).unwrap(),
        vec![(node("n3"), AgentState::Online)]
    );
    let by_id = s
        .create_task(
            &command_spec(Targets::Nodes(vec![node("n3")]), 100, 1),
            11_000,
        )
        .unwrap();
    let mut probe = command_spec(Targets::Selector(labels(&[("region", "us")])), 100, 1);
    probe.kind = TaskKind::TcpProbe {
        target: "db:5432".into(),
        timeout_ms: 500,
    };
    let by_selector = s.create_task(&probe, 11_001).unwrap();
    let other = s
        .create_task(
            &command_spec(Targets::Nodes(vec![node("n1")]), 100, 1),
            11_002,
        )
        .unwrap();

    assert_eq!(s.pending_for(&node("n1")).unwrap().len(), 1);
    assert_eq!(s.pending_for(&node("n1")).unwrap()[0].0, other);
    assert!(s.pending_for(&node("n2")).unwrap().is_empty());

    // n3 returns (after a scheduler restart, even): both tasks wait for it, oldest first.
    drop(f.store);
    let s = Store::open(&f.path).unwrap();
    assert_eq!(
        s.touch(&node("n3"), 20_000, false).unwrap(),
        Some(AgentState::Offline)
    );
    let pending = s.pending_for(&node("n3")).unwrap();
    assert_eq!(
        pending.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![by_id, by_selector]
    );
    assert_eq!(pending[1].1, probe);
    s.mark_dispatched(by_id, &node("n3"), 20_001).unwrap();
    assert_eq!(
        s.pending_for(&node("n3"))
            .unwrap()
            .iter()
            .map(|(id, _)| *id)
            .collect::<Vec<_>>(),
        vec![by_selector]
    );
}

#[test]
fn timeout_expiry_with_and_without_attempts_left() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);
    let n1 = node("n1");
    let n2 = node("n2");
    let retrying = s
        .create_task(&command_spec(Targets::Nodes(vec![n1.clone()]), 100, 2), 0)
        .unwrap();
    let once = s
        .create_task(&command_spec(Targets::Nodes(vec![n2.clone()]), 100, 1), 0)
        .unwrap();
    s.mark_dispatched(retrying, &n1, 1_000).unwrap(); // deadline 1_100
    s.mark_dispatched(once, &n2, 1_000).unwrap();
    s.mark_running(once, &n2, 1_010).unwrap(); // running keeps the deadline 1_100

    // Not yet due.
    assert!(s.expire_dispatched_before(1_100).unwrap().is_empty());

    let expired = s.expire_dispatched_before(1_101).unwrap();
    assert_eq!(
        expired,
        vec![
            Expired {
                task_id: retrying,
                node_id: n1.clone(),
                new_state: TargetState::Pending
            },
            Expired {
                task_id: once,
                node_id: n2.clone(),
                new_state: TargetState::TimedOut
            },
        ]
    );
    assert_eq!(state_of(s, once, "n2"), TargetState::TimedOut);
    let t = &s.task(retrying).unwrap().unwrap().targets[&n1];
    assert_eq!(
        (t.state, t.attempts, t.deadline_ms),
        (TargetState::Pending, 1, None)
    );
    assert_eq!(s.pending_for(&n1).unwrap()[0].0, retrying);
    // Expiry is done: nothing is expired twice.
    assert!(s.expire_dispatched_before(5_000).unwrap().is_empty());

    // Second (last) attempt times out for good; a late result is kept but changes nothing.
    s.mark_dispatched(retrying, &n1, 2_000).unwrap();
    assert_eq!(
        s.expire_dispatched_before(2_101).unwrap()[0].new_state,
        TargetState::TimedOut
    );
    let t = &s.task(retrying).unwrap().unwrap().targets[&n1];
    assert_eq!((t.state, t.attempts), (TargetState::TimedOut, 2));
    assert!(s.pending_for(&n1).unwrap().is_empty());
    assert_eq!(
        s.record_result("late", retrying, &n1, &ok_result(2_200))
            .unwrap(),
        Ingest::New
    );
    assert_eq!(state_of(s, retrying, "n1"), TargetState::TimedOut);
    let results = s.results_for(retrying).unwrap();
    assert_eq!(results.len(), 1);
    assert!(!results[0].applied);
}

#[test]
fn result_ingestion_is_idempotent_across_restarts() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);
    let n1 = node("n1");
    let n2 = node("n2");
    let t = s
        .create_task(
            &command_spec(Targets::Nodes(vec![n1.clone(), n2.clone()]), 1_000, 1),
            0,
        )
        .unwrap();
    s.mark_dispatched(t, &n1, 10).unwrap();
    s.mark_dispatched(t, &n2, 10).unwrap();

    assert_eq!(
        s.record_result("a-1", t, &n1, &ok_result(20)).unwrap(),
        Ingest::New
    );
    let after_first = s.counts().unwrap();
    assert_eq!(after_first.results, 1);
    let task_after_first = s.task(t).unwrap().unwrap();

    // A replay, even with a different body, is a duplicate and changes nothing.
    let mut replay = ok_result(25);
    replay.exit_code = Some(9);
    assert_eq!(
        s.record_result("a-1", t, &n1, &replay).unwrap(),
        Ingest::Duplicate
    );
    assert_eq!(s.counts().unwrap(), after_first);
    assert_eq!(s.task(t).unwrap().unwrap(), task_after_first);
    assert_eq!(s.results_for(t).unwrap().len(), 1);

    // The same message id from another agent is that agent's own message.
    assert_eq!(
        s.record_result("a-1", t, &n2, &ok_result(30)).unwrap(),
        Ingest::New
    );
    assert_eq!(s.counts().unwrap().results, 2);

    // Bad message ids and unknown tasks are errors that store nothing.
    assert!(matches!(
        s.record_result("", t, &n1, &ok_result(1)),
        Err(StoreError::InvalidMessageId)
    ));
    assert!(matches!(
        s.record_result("x-1", 77, &n1, &ok_result(1)),
        Err(StoreError::UnknownTask(77))
    ));
    assert_eq!(s.counts().unwrap().results, 2);

    // Restart: the results, their effect, and the idempotency set are all still there.
    let before = s.counts().unwrap();
    let task_before = s.task(t).unwrap().unwrap();
    drop(f.store);
    let s = Store::open(&f.path).unwrap();
    assert_eq!(s.counts().unwrap(), before);
    assert_eq!(s.task(t).unwrap().unwrap(), task_before);
    assert_eq!(
        s.record_result("a-1", t, &n1, &ok_result(20)).unwrap(),
        Ingest::Duplicate
    );
    assert_eq!(
        s.record_result("a-1", t, &n2, &ok_result(30)).unwrap(),
        Ingest::Duplicate
    );
    assert_eq!(s.counts().unwrap(), before);
    let stored = s.results_for(t).unwrap();
    assert_eq!(
        stored
            .iter()
            .map(|r| (r.node_id.to_string(), r.applied, r.body.finished_at_ms))
            .collect::<Vec<_>>(),
        vec![("n1".into(), true, 20), ("n2".into(), true, 30)]
    );
}

#[test]
fn reports_are_idempotent_and_bounded_per_agent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler.redb");
    let options = StoreOptions {
        reports_per_agent: 5,
        report_ids_per_agent: 8,
        ..StoreOptions::default()
    };
    let s = Store::open_with(&path, options).unwrap();
    with_fleet(&s);
    let n1 = node("n1");

    for i in 0..12u64 {
        let m = json!({"cpu": i, "disk": {"free": 100 - i}});
        assert_eq!(
            s.record_report(&format!("r-{i}"), &n1, &m, 1_000 + i)
                .unwrap(),
            Ingest::New
        );
    }
    s.record_report("r-0", &node("n2"), &json!({"cpu": 1}), 5)
        .unwrap();

    let kept = s.reports(&n1).unwrap();
    assert_eq!(
        kept.iter()
            .map(|r| r.message_id.as_str())
            .collect::<Vec<_>>(),
        ["r-7", "r-8", "r-9", "r-10", "r-11"]
    );
    assert_eq!(kept[4].metrics, json!({"cpu": 11, "disk": {"free": 89}}));
    assert_eq!(s.counts().unwrap().reports, 6);

    // Replays inside the id window are duplicates, even of reports already trimmed.
    let before = s.counts().unwrap();
    for i in [4u64, 6, 11] {
        assert_eq!(
            s.record_report(&format!("r-{i}"), &n1, &json!({}), 9_000)
                .unwrap(),
            Ingest::Duplicate
        );
    }
    assert_eq!(s.counts().unwrap(), before);
    assert_eq!(s.reports(&n1).unwrap(), kept);

    // After a restart too.
    drop(s);
    let s = Store::open_with(&path, options).unwrap();
    assert_eq!(
        s.record_report("r-11", &n1, &json!({}), 9_000).unwrap(),
        Ingest::Duplicate
    );
    assert_eq!(s.reports(&n1).unwrap(), kept);
    assert!(matches!(
        s.record_report("r-1", &node("ghost"), &json!({}), 0),
        Err(StoreError::UnknownAgent(_))
    ));

    // The bound holds under a long stream of reports.
    for i in 100..400u64 {
        s.record_report(&format!("r-{i}"), &n1, &json!({"i": i}), i)
            .unwrap();
    }
    assert_eq!(s.reports(&n1).unwrap().len(), 5);
    assert_eq!(s.counts().unwrap().reports, 6);
}

#[test]
fn a_second_open_of_the_same_file_is_refused() {
    let f = fixture();
    assert!(matches!(
        Store::open(&f.path),
        Err(StoreError::Db(servicekit::durable::DbError::Open { .. }))
    ));
    assert_eq!(f.store.path(), f.path.as_path());
}

#[test]
fn a_burst_of_results_is_stored_in_one_call_with_per_result_outcomes() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);
    let (n1, n2, n3) = (node("n1"), node("n2"), node("n3"));
    let t = s
        .create_task(
            &command_spec(Targets::Nodes(vec![n1.clone(), n2.clone()]), 1_000, 1),
            0,
        )
        .unwrap();
    let sent = s
        .mark_dispatched_many(t, &[n1.clone(), n2.clone(), n3.clone(), n1.clone()], 10)
        .unwrap();
    assert_eq!(sent[0].as_ref().ok(), Some(&1));
    assert_eq!(sent[1].as_ref().ok(), Some(&1));
    assert!(
        matches!(sent[2], Err(StoreError::NotATarget { .. })),
        "{sent:?}"
    );
    // Listed twice: the second is no longer Pending.
    assert!(
        matches!(sent[3], Err(StoreError::InvalidTransition { .. })),
        "{sent:?}"
    );
    assert!(
        s.mark_dispatched_many(999, std::slice::from_ref(&n1), 10)
            .is_err()
    );

    let (ok, bad) = (ok_result(20), ok_result(21));
    let batch = [
        NewResult {
            message_id: "m-1",
            task_id: t,
            node_id: &n1,
            body: &ok,
        },
        // The same message again inside the burst: a duplicate, stored once.
        NewResult {
            message_id: "m-1",
            task_id: t,
            node_id: &n1,
            body: &bad,
        },
        NewResult {
            message_id: "m-2",
            task_id: t,
            node_id: &n2,
            body: &ok,
        },
        NewResult {
            message_id: "m-3",
            task_id: 999,
            node_id: &n2,
            body: &ok,
        },
        NewResult {
            message_id: "m-4",
            task_id: t,
            node_id: &n3,
            body: &ok,
        },
        NewResult {
            message_id: "",
            task_id: t,
            node_id: &n2,
            body: &ok,
        },
    ];
    let out = s.record_results(&batch).unwrap();
    assert_eq!(out[0].as_ref().ok(), Some(&Ingest::New));
    assert_eq!(out[1].as_ref().ok(), Some(&Ingest::Duplicate));
    assert_eq!(out[2].as_ref().ok(), Some(&Ingest::New));
    assert!(
        matches!(out[3], Err(StoreError::UnknownTask(999))),
        "{out:?}"
    );
    assert!(
        matches!(out[4], Err(StoreError::NotATarget { .. })),
        "{out:?}"
    );
    assert!(
        matches!(out[5], Err(StoreError::InvalidMessageId)),
        "{out:?}"
    );
    let task = s.task(t).unwrap().unwrap();
    assert!(
        task.targets
            .values()
            .all(|t| t.state == TargetState::Succeeded)
    );
    assert_eq!(s.counts().unwrap().results, 2);

    // A replayed burst changes nothing.
    let before = s.counts().unwrap();
    let again = s.record_results(&batch[..3]).unwrap();
    assert!(again.iter().all(|o| matches!(o, Ok(Ingest::Duplicate))));
    assert_eq!(s.counts().unwrap(), before);
}

#[test]
fn many_started_in_one_call_with_per_target_outcomes() {
    let f = fixture();
    let s = &f.store;
    with_fleet(s);
    let (n1, n2, n3) = (node("n1"), node("n2"), node("n3"));
    let t = s
        .create_task(
            &command_spec(Targets::Nodes(vec![n1.clone(), n2.clone()]), 1_000, 1),
            0,
        )
        .unwrap();
    s.mark_dispatched(t, &n1, 10).unwrap();
    let out = s
        .mark_running_many(&[(t, &n1, 11), (t, &n2, 11), (t, &n3, 11), (999, &n1, 11)])
        .unwrap();
    assert!(out[0].is_ok(), "{out:?}");
    // n2 was never dispatched: Pending cannot go to Running.
    assert!(
        matches!(out[1], Err(StoreError::InvalidTransition { .. })),
        "{out:?}"
    );
    assert!(
        matches!(out[2], Err(StoreError::NotATarget { .. })),
        "{out:?}"
    );
    assert!(
        matches!(out[3], Err(StoreError::UnknownTask(999))),
        "{out:?}"
    );
    let task = s.task(t).unwrap().unwrap();
    assert_eq!(task.targets[&n1].state, TargetState::Running);
    assert_eq!(task.targets[&n2].state, TargetState::Pending);
    // A repeat changes nothing (Running to Running is refused, nothing is written).
    let again = s.mark_running_many(&[(t, &n1, 12)]).unwrap();
    assert!(again[0].is_err());
    assert_eq!(s.task(t).unwrap().unwrap(), task);
}

fn audit_entry(action: &str) -> scheduler::store::NewAuditEntry {
    scheduler::store::NewAuditEntry {
        actor: "ops".into(),
        action: action.into(),
        target: "config/x".into(),
        detail: json!({}),
        trace_id: None,
    }
}

fn new_config(name: &str, content: &str, targets: Targets) -> scheduler::store::NewConfigVersion {
    scheduler::store::NewConfigVersion {
        name: name.into(),
        content: content.as_bytes().to_vec(),
        validate: None,
        reload: None,
        targets,
        actor: "ops".into(),
        activate: true,
    }
}

fn ack(
    name: &str,
    version: u64,
    content: &str,
    error: Option<&str>,
    at_ms: u64,
) -> messages::fleet::ConfigAck {
    messages::fleet::ConfigAck {
        message_id: format!("m-{at_ms}"),
        name: name.into(),
        version,
        sha256: messages::fleet::config_sha256(content.as_bytes()),
        status: if error.is_some() {
            messages::fleet::ConfigOutcome::Failed
        } else {
            messages::fleet::ConfigOutcome::Applied
        },
        error: error.map(str::to_owned),
        at_ms,
    }
}

#[test]
fn config_versions_history_rollback_and_node_states_survive_a_reopen() {
    use scheduler::store::{CONFIG_HISTORY, ConfigState, NewConfigAck};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).unwrap();
    store
        .upsert_agent(&agent("eu-1", &[("region", "eu")], 1))
        .unwrap();
    store
        .upsert_agent(&agent("us-1", &[("region", "us")], 1))
        .unwrap();
    let eu = Targets::Selector(labels(&[("region", "eu")]));

    // Bad requests store nothing.
    for (name, targets) in [
        ("../x", eu.clone()),
        (".x", eu.clone()),
        ("x", Targets::Nodes(vec![])),
        ("x", Targets::Selector(labels(&[]))),
    ] {
        let r = store.set_config(&new_config(name, "c", targets), 10, |_, _| {
            audit_entry("config.set")
        });
        assert!(
            matches!(r, Err(StoreError::InvalidConfig(_))),
            "{name}: {r:?}"
        );
    }
    assert!(matches!(
        store.set_config(
            &new_config("x", "c", Targets::Selector(labels(&[("region", "mars")]))),
            10,
            |_, _| audit_entry("config.set")
        ),
        Err(StoreError::NoTargets)
    ));
    assert!(store.configs().unwrap().is_empty());
    assert!(store.audit(0, 100).unwrap().is_empty());

    let (v1, nodes, entry) = store
        .set_config(&new_config("app.conf", "one", eu.clone()), 10, |_, _| {
            audit_entry("config.set")
        })
        .unwrap();
    assert_eq!((v1.version, entry.seq), (1, 1));
    assert_eq!(nodes.into_iter().collect::<Vec<_>>(), [node("eu-1")]);
    let (_, status) = store.config_status("app.conf").unwrap();
    assert_eq!(status[0].state, ConfigState::Pending);

    // Applied, then a failed attempt at version 2 keeps version 1 and says why.
    let eu1 = node("eu-1");
    assert!(
        store
            .record_config_ack(&NewConfigAck {
                node_id: &eu1,
                ack: &ack("app.conf", 1, "one", None, 20)
            })
            .unwrap()
    );
    assert_eq!(
        store.config_status("app.conf").unwrap().1[0].state,
        ConfigState::Applied
    );
    store
        .set_config(&new_config("app.conf", "two", eu.clone()), 30, |_, _| {
            audit_entry("config.set")
        })
        .unwrap();
    store
        .record_config_ack(&NewConfigAck {
            node_id: &eu1,
            ack: &ack("app.conf", 2, "two", Some("validate failed"), 40),
        })
        .unwrap();
    // A replayed older ack changes nothing.
    store
        .record_config_ack(&NewConfigAck {
            node_id: &eu1,
            ack: &ack("app.conf", 1, "one", None, 20),
        })
        .unwrap();
    let (desired, status) = store.config_status("app.conf").unwrap();
    assert_eq!(desired.version, 2);
    assert_eq!(status[0].state, ConfigState::Failed);
    assert_eq!(status[0].error.as_deref(), Some("validate failed"));
    assert_eq!(status[0].applied_version, Some(1));
    // An ack from a node that is not a target is dropped.
    let us1 = node("us-1");
    assert!(
        !store
            .record_config_ack(&NewConfigAck {
                node_id: &us1,
                ack: &ack("app.conf", 2, "two", None, 50)
            })
            .unwrap()
    );

    // Rollback to 1: eu-1 already runs it; to an unknown version: refused.
    let (back, _, _) = store
        .rollback_config("app.conf", 1, 60, |_, from| {
            assert_eq!(from, 2);
            audit_entry("config.rollback")
        })
        .unwrap();
    assert_eq!(back.sha256, messages::fleet::config_sha256(b"one"));
    assert_eq!(
        store.config_status("app.conf").unwrap().1[0].state,
        ConfigState::Applied
    );
    assert!(matches!(
        store.rollback_config("app.conf", 9, 60, |_, _| audit_entry("config.rollback")),
        Err(StoreError::UnknownConfigVersion { version: 9, .. })
    ));
    assert!(matches!(
        store.rollback_config("nope", 1, 60, |_, _| audit_entry("config.rollback")),
        Err(StoreError::UnknownConfig(_))
    ));

    // An agent registering later with matching labels joins; what it reports decides what
    // it lacks (another hash = drift).
    let late = agent("eu-2", &[("region", "eu")], 70);
    store.upsert_agent(&late).unwrap();
    let lacking = store
        .configs_to_converge(&late, &BTreeMap::new(), 70)
        .unwrap();
    assert_eq!(lacking.iter().map(|v| v.version).collect::<Vec<_>>(), [1]);
    let has = |content: &str| {
        BTreeMap::from([(
            "app.conf".to_owned(),
            messages::fleet::AppliedConfig {
                version: 1,
                sha256: messages::fleet::config_sha256(content.as_bytes()),
            },
        )])
    };
    assert!(
        store
            .configs_to_converge(&late, &has("one"), 71)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store
            .configs_to_converge(&late, &has("edited"), 72)
            .unwrap()
            .len(),
        1
    );
    let us = agent("us-1", &[("region", "us")], 73);
    assert!(
        store
            .configs_to_converge(&us, &BTreeMap::new(), 73)
            .unwrap()
            .is_empty()
    );

    // Bounded history: the oldest versions go, the newest CONFIG_HISTORY stay.
    for i in 0..CONFIG_HISTORY + 5 {
        store
            .set_config(
                &new_config("app.conf", &format!("c{i}"), eu.clone()),
                100 + i,
                |_, _| audit_entry("config.set"),
            )
            .unwrap();
    }
    let history = store.config_history("app.conf").unwrap();
    assert_eq!(history.len() as u64, CONFIG_HISTORY);
    let latest = 2 + CONFIG_HISTORY + 5;
    assert_eq!(history.last().map(|v| v.version), Some(latest));
    assert_eq!(
        history.first().map(|v| v.version),
        Some(latest - CONFIG_HISTORY + 1)
    );
    assert!(matches!(
        store.config_version("app.conf", Some(1)),
        Err(StoreError::UnknownConfigVersion { .. })
    ));
    drop(store);

    // Everything is durable.
    let store = Store::open(&path).unwrap();
    let head = store.config("app.conf").unwrap().unwrap();
    assert_eq!((head.desired, head.latest), (latest, latest));
    assert_eq!(head.nodes.len(), 2);
    assert_eq!(
        store.audit(0, 1000).unwrap().len() as u64,
        3 + CONFIG_HISTORY + 5
    );
}

#[test]
fn artifacts_and_upgrades_move_forward_and_survive_a_reopen() {
    use messages::fleet::{UpgradeOutcome, UpgradeResult, config_sha256};
    use scheduler::store::{ArtifactRecord, NewUpgrade, UpgradeState};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).unwrap();
    store
        .upsert_agent(&agent("eu-1", &[("region", "eu")], 1))
        .unwrap();
    store
        .upsert_agent(&agent("eu-2", &[("region", "eu")], 1))
        .unwrap();
    let sha = config_sha256(b"agent v2");
    let new = |sha: &str, version: &str| NewUpgrade {
        sha256: sha.into(),
        version: version.into(),
        deadline_ms: 60_000,
        os: None,
        arch: None,
        targets: Targets::Selector(labels(&[("region", "eu")])),
        actor: "ops".into(),
    };
    // Unknown artifacts and bad requests store nothing.
    assert!(matches!(
        store.create_upgrade(&new(&sha, "2.0"), 5, |_, _| audit_entry("upgrade.start")),
        Err(StoreError::UnknownArtifact(_))
    ));
    for bad in [new("abc", "2.0"), new(&sha, "2 0"), {
        let mut n = new(&sha, "2.0");
        n.deadline_ms = 10;
        n
    }] {
        assert!(matches!(
            store.create_upgrade(&bad, 5, |_, _| audit_entry("upgrade.start")),
            Err(StoreError::InvalidUpgrade(_))
        ));
    }
    let artifact = ArtifactRecord {
        sha256: sha.clone(),
        size: 8,
        uploaded_at_ms: 10,
        actor: "ops".into(),
    };
    let (_, first, _) = store
        .put_artifact(&artifact, |_, _| audit_entry("artifact.upload"))
        .unwrap();
    assert!(first);
    let mut again = artifact.clone();
    again.uploaded_at_ms = 20;
    let (kept, first, _) = store
        .put_artifact(&again, |_, _| audit_entry("artifact.upload"))
        .unwrap();
    assert!(!first);
    assert_eq!(kept, artifact);

    let (upgrade, nodes, _) = store
        .create_upgrade(&new(&sha, "2.0"), 30, |_, _| audit_entry("upgrade.start"))
        .unwrap();
    assert_eq!(upgrade.size, 8);
    assert_eq!(nodes.len(), 2);
    let manifest = upgrade.manifest();
    assert_eq!(manifest.path, format!("/v1/artifacts/{sha}"));
    assert_eq!(manifest.check("linux", "x86_64"), Ok(()));

    let report = |status, running: &str| UpgradeResult {
        message_id: "m".into(),
        upgrade_id: upgrade.id,
        version: "2.0".into(),
        sha256: sha.clone(),
        status,
        error: Some("why".into()),
        running_version: running.into(),
        at_ms: 0,
    };
    let eu1 = node("eu-1");
    let eu2 = node("eu-2");
    assert_eq!(
        store
            .record_upgrade_result(&eu1, &report(UpgradeOutcome::Installed, "1.0"), 40)
            .unwrap(),
        Some(UpgradeState::Installed)
    );
    // A replayed earlier report changes nothing.
    assert_eq!(
        store
            .record_upgrade_result(&eu1, &report(UpgradeOutcome::Downloading, "1.0"), 41)
            .unwrap(),
        Some(UpgradeState::Installed)
    );
    // A register with the target version finishes it; pending ones are handed back.
    assert!(
        store
            .upgrades_at_register(&eu1, "2.0", 50)
            .unwrap()
            .is_empty()
    );
    let pending = store.upgrades_at_register(&eu2, "1.0", 50).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, upgrade.id);
    // The watchdog's rollback has the last word, even over online.
    assert_eq!(
        store
            .record_upgrade_result(&eu1, &report(UpgradeOutcome::RolledBack, "1.0"), 60)
            .unwrap(),
        Some(UpgradeState::RolledBack)
    );
    // Not a target: nothing stored.
    assert_eq!(
        store
            .record_upgrade_result(&node("us-9"), &report(UpgradeOutcome::Failed, "1.0"), 60)
            .unwrap(),
        None
    );
    drop(store);

    let store = Store::open(&path).unwrap();
    assert_eq!(store.artifacts().unwrap(), vec![artifact]);
    let (again, states) = store.upgrade(upgrade.id).unwrap();
    assert_eq!(again, upgrade);
    let by_node: BTreeMap<String, (UpgradeState, Option<String>)> = states
        .into_iter()
        .map(|s| (s.node_id, (s.state, s.error)))
        .collect();
    assert_eq!(
        by_node["eu-1"],
        (UpgradeState::RolledBack, Some("why".into()))
    );
    assert_eq!(by_node["eu-2"].0, UpgradeState::Pending);
    // Rolled back is final: a register no longer touches it; eu-2 is still pending.
    assert!(
        store
            .upgrades_at_register(&eu1, "2.0", 70)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.upgrades_at_register(&eu2, "1.0", 70).unwrap().len(),
        1
    );
    assert_eq!(store.upgrades(10).unwrap().len(), 1);
    assert!(matches!(
        store.upgrade(99),
        Err(StoreError::UnknownUpgrade(99))
    ));
    assert_eq!(store.audit(0, 100).unwrap().len(), 3);
}
