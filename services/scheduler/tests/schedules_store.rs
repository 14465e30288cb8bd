#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Schedules in the store against real redb files: firing a period is durable and happens
//! once (also after the file is reopened, as a standby taking over would), the overlap
//! policy, failures that create no task, pause/resume and delete, all audited.

use std::collections::BTreeMap;

use messages::UserId;
use scheduler::store::{
    AgentRecord, AgentState, Fire, NewAuditEntry, NewSchedule, Overlap, ResultBody, Store,
    StoreError, Targets, TaskKind, TaskSpec,
};
use serde_json::json;

/// 2026-01-01T00:00:00Z in ms.
const T0_MS: u64 = 1_767_225_600_000;
const T0: u64 = T0_MS / 1000;

fn node(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn agent(id: &str, region: &str) -> AgentRecord {
    AgentRecord {
        node_id: node(id),
        hostname: id.into(),
        version: "0.1.0".into(),
        labels: [("region".to_owned(), region.to_owned())].into(),
        addresses: vec![],
        registered_at_ms: T0_MS,
        last_seen_ms: T0_MS,
        state: AgentState::Online,
        via: None,
    }
}

fn spec(targets: Targets) -> TaskSpec {
    TaskSpec {
        kind: TaskKind::Command {
            argv: vec!["true".into()],
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: 1_000,
        },
        targets,
        timeout_ms: 5_000,
        max_attempts: 1,
        traceparent: None,
    }
}

fn new_schedule(overlap: Overlap, targets: Targets) -> NewSchedule {
    NewSchedule {
        cron: "*/5 * * * *".into(),
        overlap,
        task: spec(targets),
        created_by: "ops".into(),
    }
}

fn entry(action: &str, detail: serde_json::Value) -> NewAuditEntry {
    NewAuditEntry {
        actor: "ops".into(),
        action: action.into(),
        target: "schedule".into(),
        detail,
        trace_id: None,
    }
}

fn fire(store: &Store, id: u64, period: u64) -> Fire {
    store
        .fire_schedule(id, period, period * 1000, 86_400_000, |f| {
            entry("schedule.fire", json!(format!("{f:?}")))
        })
        .unwrap()
        .0
}

fn finish(store: &Store, task: u64, n: &str) {
    store.mark_dispatched(task, &node(n), T0_MS).unwrap();
    let body = ResultBody {
        exit_code: Some(0),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        error: None,
        latency_ms: None,
        finished_at_ms: T0_MS,
        output_chunks: 0,
    };
    store
        .record_result(&format!("m-{task}"), task, &node(n), &body)
        .unwrap();
}

#[test]
fn a_period_fires_once_even_after_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (id, first) = {
        let store = Store::open(&path).unwrap();
        store.upsert_agent(&agent("edge-1", "eu")).unwrap();
        let (rec, audit) = store
            .create_schedule(
                &new_schedule(Overlap::Allow, Targets::Nodes(vec![node("edge-1")])),
                T0_MS,
                |id| entry("schedule.create", json!({ "id": id })),
            )
            .unwrap();
        assert_eq!(audit.action, "schedule.create");
        assert_eq!(rec.since_secs, T0);
        let Fire::Created(task) = fire(&store, rec.id, T0 + 300) else {
            panic!("first fire creates a task");
        };
        // The same period again in the same process: nothing new.
        assert_eq!(fire(&store, rec.id, T0 + 300), Fire::NotDue);
        (rec.id, task)
    };
    // A new process (the standby that took over) opens the same file.
    let store = Store::open(&path).unwrap();
    let rec = store.schedule(id).unwrap().unwrap();
    assert_eq!(rec.since_secs, T0 + 300);
    assert_eq!(rec.last_fire_secs, Some(T0 + 300));
    assert_eq!(rec.last_task_id, Some(first));
    assert_eq!(rec.fired, 1);
    assert_eq!(fire(&store, id, T0 + 300), Fire::NotDue);
    assert_eq!(fire(&store, id, T0 + 200), Fire::NotDue);
    assert_eq!(store.tasks(100, None).unwrap().len(), 1);
    // The next period is a new task.
    assert!(matches!(fire(&store, id, T0 + 600), Fire::Created(t) if t != first));
    assert_eq!(store.tasks(100, None).unwrap().len(), 2);
    let fires = store
        .audit(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "schedule.fire")
        .count();
    assert_eq!(fires, 2);
}

#[test]
fn skip_waits_for_the_previous_run_and_allow_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    store.upsert_agent(&agent("edge-1", "eu")).unwrap();
    let targets = Targets::Selector([("region".to_owned(), "eu".to_owned())].into());
    let mk = |overlap| {
        store
            .create_schedule(&new_schedule(overlap, targets.clone()), T0_MS, |_| {
                entry("schedule.create", json!({}))
            })
            .unwrap()
            .0
            .id
    };
    let skip = mk(Overlap::Skip);
    let allow = mk(Overlap::Allow);

    let Fire::Created(first) = fire(&store, skip, T0 + 300) else {
        panic!()
    };
    // Still pending: the next period is skipped, and counts as done.
    assert_eq!(
        fire(&store, skip, T0 + 600),
        Fire::Skipped { running: first }
    );
    assert_eq!(fire(&store, skip, T0 + 600), Fire::NotDue);
    let rec = store.schedule(skip).unwrap().unwrap();
    assert_eq!((rec.fired, rec.skipped, rec.since_secs), (1, 1, T0 + 600));
    finish(&store, first, "edge-1");
    assert!(matches!(fire(&store, skip, T0 + 900), Fire::Created(_)));

    assert!(matches!(fire(&store, allow, T0 + 300), Fire::Created(_)));
    assert!(matches!(fire(&store, allow, T0 + 600), Fire::Created(_)));
    assert_eq!(store.schedule(allow).unwrap().unwrap().skipped, 0);
}

#[test]
fn a_fire_without_targets_records_why_and_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    let (rec, _) = store
        .create_schedule(
            &new_schedule(
                Overlap::Skip,
                Targets::Selector([("region".to_owned(), "mars".to_owned())].into()),
            ),
            T0_MS,
            |_| entry("schedule.create", json!({})),
        )
        .unwrap();
    assert!(matches!(fire(&store, rec.id, T0 + 300), Fire::Failed(_)));
    let rec = store.schedule(rec.id).unwrap().unwrap();
    assert!(rec.last_error.unwrap().contains("no agent"));
    assert_eq!(rec.since_secs, T0 + 300);
    assert_eq!(rec.fired, 0);
    assert!(store.tasks(10, None).unwrap().is_empty());
}

#[test]
fn pause_resume_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    store.upsert_agent(&agent("edge-1", "eu")).unwrap();
    let (rec, _) = store
        .create_schedule(
            &new_schedule(Overlap::Allow, Targets::Nodes(vec![node("edge-1")])),
            T0_MS,
            |_| entry("schedule.create", json!({})),
        )
        .unwrap();
    let id = rec.id;
    let (paused, _) = store
        .set_schedule_paused(id, true, T0_MS + 1000, |_| {
            entry("schedule.pause", json!({}))
        })
        .unwrap();
    assert!(paused.paused);
    assert_eq!(fire(&store, id, T0 + 300), Fire::NotDue);
    // Resumed an hour later: the periods it was paused for are not caught up.
    let (resumed, _) = store
        .set_schedule_paused(id, false, T0_MS + 3_600_000, |_| {
            entry("schedule.resume", json!({}))
        })
        .unwrap();
    assert!(!resumed.paused);
    assert_eq!(resumed.since_secs, T0 + 3600);
    assert_eq!(fire(&store, id, T0 + 3000), Fire::NotDue);
    assert!(matches!(fire(&store, id, T0 + 3900), Fire::Created(_)));

    store
        .delete_schedule(id, T0_MS, |_| entry("schedule.delete", json!({})))
        .unwrap();
    assert!(store.schedule(id).unwrap().is_none());
    assert_eq!(fire(&store, id, T0 + 4200), Fire::NotDue);
    assert!(matches!(
        store.delete_schedule(id, T0_MS, |_| entry("x", json!({}))),
        Err(StoreError::UnknownSchedule(_))
    ));
    // Ids are not reused.
    let (next, _) = store
        .create_schedule(
            &new_schedule(Overlap::Allow, Targets::Nodes(vec![node("edge-1")])),
            T0_MS,
            |_| entry("schedule.create", json!({})),
        )
        .unwrap();
    assert!(next.id > id);
}

#[test]
fn a_fire_is_keyed_by_schedule_and_period() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    store.upsert_agent(&agent("edge-1", "eu")).unwrap();
    let (rec, _) = store
        .create_schedule(
            &new_schedule(Overlap::Allow, Targets::Nodes(vec![node("edge-1")])),
            T0_MS,
            |_| entry("schedule.create", json!({})),
        )
        .unwrap();
    let Fire::Created(task) = fire(&store, rec.id, T0 + 300) else {
        panic!()
    };
    // The key an evaluation of the same period would claim is taken, by this task: a
    // create under it replays instead of making a second task.
    let claim = scheduler::store::IdempotencyClaim {
        actor: scheduler::store::SCHEDULE_ACTOR.into(),
        key: scheduler::store::fire_key(rec.id, T0 + 300),
        fingerprint: scheduler::store::fire_key(rec.id, T0 + 300),
        not_before_ms: 0,
    };
    assert_eq!(claim.key, format!("schedule:{}:{}", rec.id, T0 + 300));
    let (created, _) = store
        .create_task_once(&rec.task, T0_MS, Some(&claim), |_| entry("x", json!({})))
        .unwrap();
    assert_eq!(created, scheduler::store::Created::Replayed(task));
    assert_eq!(store.tasks(10, None).unwrap().len(), 1);
}
