#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Staged rollouts in the store against real redb files: stage planning, batches that go
//! out in rollout order exactly once (also after the file is reopened, as a standby taking
//! over would), the failure threshold halting mid-stage, promote, resume after a halt,
//! batch deadlines, and abort, each step audited; config-version rollouts that pin batch
//! by batch and make the version desired when they complete.

use std::collections::{BTreeMap, BTreeSet};

use messages::UserId;
use messages::fleet::{AppliedConfig, ConfigAck, ConfigOutcome};
use scheduler::store::{
    AgentRecord, AgentState, ArtifactRecord, ConfigState, Control, NewAuditEntry, NewConfigAck,
    NewConfigVersion, NewRollout, ResultBody, RolloutAction, RolloutConfig, RolloutRecord,
    RolloutState, RolloutTask, RolloutUpgrade, Size, StagePlan, StartedWork, Step, Store,
    StoreError, Targets, TaskKind, UpgradeState, plan_stages,
};
use serde_json::json;

const T0: u64 = 1_767_225_600_000;

fn node(s: &str) -> UserId {
    UserId::new(s).unwrap()
}

fn agent(id: &str) -> AgentRecord {
    AgentRecord {
        node_id: node(id),
        hostname: id.into(),
        version: "0.1.0".into(),
        labels: [("fleet".to_owned(), "edge".to_owned())].into(),
        addresses: vec![],
        registered_at_ms: T0,
        last_seen_ms: T0,
        state: AgentState::Online,
        via: None,
    }
}

fn fleet(store: &Store, n: usize) {
    for i in 0..n {
        store.upsert_agent(&agent(&format!("n{i:03}"))).unwrap();
    }
}

fn entry(what: &str) -> NewAuditEntry {
    NewAuditEntry {
        actor: "ops".into(),
        action: what.into(),
        target: "rollout".into(),
        detail: json!({}),
        trace_id: None,
    }
}

fn new_rollout(stages: Vec<StagePlan>, batch: Option<Size>, max_failure_percent: u8) -> NewRollout {
    NewRollout {
        action: RolloutAction::Task(RolloutTask {
            kind: TaskKind::Command {
                argv: vec!["true".into()],
                env: BTreeMap::new(),
                cwd: None,
                timeout_ms: 1_000,
            },
            timeout_ms: 5_000,
            max_attempts: 1,
        }),
        targets: Targets::Selector([("fleet".to_owned(), "edge".to_owned())].into()),
        stages,
        batch,
        pause_ms: 1_000,
        max_failure_percent,
        batch_timeout_ms: 60_000,
        auto_promote: false,
        created_by: "ops".into(),
    }
}

fn stage(name: &str, size: Size) -> StagePlan {
    StagePlan {
        name: name.into(),
        size,
    }
}

fn step(store: &Store, id: u64, at: u64) -> Step {
    store
        .step_rollout(id, at, |_, _| entry("rollout.step"))
        .unwrap()
        .0
}

fn get(store: &Store, id: u64) -> RolloutRecord {
    store.rollout(id).unwrap().unwrap()
}

/// The agent's answer for one target.
fn answer(store: &Store, task: u64, n: &UserId, ok: bool) {
    store.mark_dispatched(task, n, T0).unwrap();
    let body = ResultBody {
        exit_code: Some(if ok { 0 } else { 1 }),
        stdout_tail: String::new(),
        stderr_tail: String::new(),
        error: None,
        latency_ms: None,
        finished_at_ms: T0,
        output_chunks: 0,
    };
    store
        .record_result(&format!("m-{task}-{n}"), task, n, &body)
        .unwrap();
}

fn started(step: Step) -> (u64, Vec<UserId>) {
    match step {
        Step::Started {
            work: StartedWork::Task { task_id, .. },
            nodes,
        } => (task_id, nodes),
        other => panic!("expected a batch to start, got {other:?}"),
    }
}

#[test]
fn stages_are_cumulative_rounded_up_and_checked() {
    let plans = vec![
        stage("pilot", Size::Percent(1)),
        stage("gray", Size::Percent(20)),
        stage("full", Size::Percent(100)),
    ];
    let s = plan_stages(&plans, 10_000, Some(Size::Percent(10)), 5).unwrap();
    let spans: Vec<_> = s.iter().map(|s| (s.start, s.end, s.batch)).collect();
    assert_eq!(
        spans,
        vec![(0, 100, 10), (100, 2_000, 190), (2_000, 10_000, 800)]
    );
    assert_eq!(s[1].allowed_failures, 95);
    // A pilot of 1% of 3 nodes is still one node.
    let s = plan_stages(&plans, 3, None, 0).unwrap();
    assert_eq!((s[0].start, s[0].end, s[0].batch), (0, 1, 1));
    assert_eq!((s[2].start, s[2].end), (1, 3));
    // Sizes go down: refused, with a reason.
    let bad = vec![stage("a", Size::Count(50)), stage("b", Size::Count(10))];
    assert!(
        plan_stages(&bad, 100, None, 0)
            .unwrap_err()
            .contains("cumulative")
    );
    assert!(plan_stages(&[stage("bad name!", Size::Count(1))], 5, None, 0).is_err());
    assert!(plan_stages(&[], 5, None, 0).is_err());
    assert_eq!(Size::parse("10%"), Ok(Size::Percent(10)));
    assert_eq!(Size::parse(" 25 "), Ok(Size::Count(25)));
    for bad in ["0", "0%", "101%", "-1", "x", ""] {
        assert!(Size::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn batches_go_out_in_order_once_with_pauses_and_a_promote_between_stages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let store = Store::open(&path).unwrap();
    fleet(&store, 10);
    let new = new_rollout(
        vec![
            stage("pilot", Size::Count(2)),
            stage("full", Size::Percent(100)),
        ],
        Some(Size::Count(4)),
        0,
    );
    let (rec, _) = store
        .create_rollout(&new, T0, |_| entry("rollout.create"))
        .unwrap();
    let id = rec.id;
    let order = store.rollout_nodes(id).unwrap();
    assert_eq!(order.len(), 10);
    assert_eq!(
        order.iter().collect::<BTreeSet<_>>().len(),
        10,
        "every target once"
    );
    assert_ne!(
        order,
        {
            let mut sorted = order.clone();
            sorted.sort();
            sorted
        },
        "the order is spread, not alphabetical (fails with probability 1/10!)"
    );

    // Pilot: one batch of two.
    let (task, nodes) = started(step(&store, id, T0));
    assert_eq!(nodes, order[0..2]);
    // Nothing more until the batch is done.
    assert_eq!(step(&store, id, T0 + 10), Step::Idle);
    for n in &nodes {
        answer(&store, task, n, true);
    }
    match step(&store, id, T0 + 20) {
        Step::Finished { outcome, state, .. } => {
            assert_eq!((outcome.succeeded, outcome.failed), (2, 0));
            assert_eq!(state, RolloutState::AwaitingPromotion);
        }
        other => panic!("{other:?}"),
    }
    // Waits for the operator, however long.
    assert_eq!(step(&store, id, T0 + 3_600_000), Step::Idle);
    store
        .control_rollout(id, Control::Promote, T0 + 30, |_| entry("rollout.control"))
        .unwrap();

    // Reopened, as a standby that takes over would: the plan and progress are on disk.
    drop(store);
    let store = Store::open(&path).unwrap();
    let mut seen: Vec<UserId> = nodes;
    let mut at = T0 + 40;
    let mut batches = 0;
    loop {
        match step(&store, id, at) {
            Step::Started {
                work: StartedWork::Task { task_id, .. },
                nodes,
            } => {
                batches += 1;
                assert!(nodes.len() <= 4);
                for n in &nodes {
                    answer(&store, task_id, n, true);
                }
                seen.extend(nodes);
            }
            Step::Finished { state, .. } => {
                if state == RolloutState::Completed {
                    break;
                }
                // The pause: no batch starts before it is over.
                assert_eq!(step(&store, id, at + 1), Step::Idle);
            }
            Step::Idle => {}
            other => panic!("{other:?}"),
        }
        at += 1_000;
        assert!(at < T0 + 60_000, "rollout did not finish");
    }
    assert_eq!(batches, 2, "8 nodes in batches of 4");
    assert_eq!(seen, order, "each target exactly once, in rollout order");
    let rec = get(&store, id);
    assert_eq!(rec.state, RolloutState::Completed);
    assert_eq!(rec.done(), (10, 0));
    assert_eq!(rec.history.len(), 3);
    assert!(store.active_rollouts().unwrap().is_empty());
    // Steps of a finished rollout do nothing; controls are refused.
    assert_eq!(step(&store, id, at + 10_000), Step::Idle);
    assert!(matches!(
        store.control_rollout(id, Control::Resume, at, |_| entry("x")),
        Err(StoreError::RolloutConflict { .. })
    ));
}

#[test]
fn a_stage_over_its_threshold_halts_mid_batch_and_resume_accepts_the_failures() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    fleet(&store, 20);
    // One stage of 20, batches of 5, 10% (2 failures) tolerated.
    let mut new = new_rollout(
        vec![stage("full", Size::Percent(100))],
        Some(Size::Count(5)),
        10,
    );
    new.pause_ms = 0;
    let (rec, _) = store.create_rollout(&new, T0, |_| entry("c")).unwrap();
    let id = rec.id;
    let (task, nodes) = started(step(&store, id, T0));
    answer(&store, task, &nodes[0], false);
    answer(&store, task, &nodes[1], false);
    // Two failures: at the threshold, not over it; the batch is still running.
    assert_eq!(step(&store, id, T0 + 1), Step::Idle);
    answer(&store, task, &nodes[2], false);
    // The third failure halts at once: no new batch, but the batch in flight finishes.
    match step(&store, id, T0 + 2) {
        Step::Halted(reason) => assert!(reason.contains("3 of 20"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(get(&store, id).state, RolloutState::Halted);
    assert_eq!(step(&store, id, T0 + 3), Step::Idle);
    answer(&store, task, &nodes[3], true);
    answer(&store, task, &nodes[4], false);
    match step(&store, id, T0 + 4) {
        Step::Finished { outcome, state, .. } => {
            assert_eq!(state, RolloutState::Halted);
            assert_eq!(
                (outcome.succeeded, outcome.failed, outcome.unfinished),
                (1, 4, 0)
            );
        }
        other => panic!("{other:?}"),
    }
    let rec = get(&store, id);
    assert!(
        rec.reason.as_deref().unwrap().contains("4 of 20"),
        "{:?}",
        rec.reason
    );
    // Halted: nothing starts.
    assert_eq!(step(&store, id, T0 + 100_000), Step::Idle);
    // Promote is not for halts.
    assert!(matches!(
        store.control_rollout(id, Control::Promote, T0, |_| entry("x")),
        Err(StoreError::RolloutConflict { .. })
    ));
    // Resume: the 4 failures are accepted; the next batch goes out, and the
    // threshold applies afresh to what follows.
    store
        .control_rollout(id, Control::Resume, T0 + 200_000, |_| entry("r"))
        .unwrap();
    let (task2, nodes2) = started(step(&store, id, T0 + 200_001));
    assert!(
        nodes2.iter().all(|n| !nodes.contains(n)),
        "no batch repeated"
    );
    for n in &nodes2 {
        answer(&store, task2, n, true);
    }
    match step(&store, id, T0 + 200_002) {
        Step::Finished { state, .. } => assert_eq!(state, RolloutState::Running),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_batch_past_its_deadline_counts_agents_that_did_not_answer_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    fleet(&store, 4);
    let mut new = new_rollout(vec![stage("full", Size::Percent(100))], None, 50);
    new.batch_timeout_ms = 10_000;
    let (rec, _) = store.create_rollout(&new, T0, |_| entry("c")).unwrap();
    let (task, nodes) = started(step(&store, rec.id, T0));
    answer(&store, task, &nodes[0], true);
    // One agent took the task and went quiet; two never got it (offline).
    store.mark_dispatched(task, &nodes[1], T0).unwrap();
    assert_eq!(step(&store, rec.id, T0 + 9_999), Step::Idle);
    match step(&store, rec.id, T0 + 10_000) {
        Step::Finished {
            outcome,
            state,
            cancelled,
        } => {
            assert_eq!((outcome.succeeded, outcome.unfinished), (1, 3));
            // 3 of 4 failed, 2 tolerated.
            assert_eq!(state, RolloutState::Halted);
            // The in-flight one is told to stop; the pending ones never left the store.
            assert_eq!(cancelled, vec![nodes[1].clone()]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn abort_cancels_the_batch_in_flight_and_ends_the_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    fleet(&store, 6);
    let new = new_rollout(
        vec![stage("full", Size::Percent(100))],
        Some(Size::Count(3)),
        0,
    );
    let (rec, _) = store.create_rollout(&new, T0, |_| entry("c")).unwrap();
    let (task, nodes) = started(step(&store, rec.id, T0));
    store.mark_dispatched(task, &nodes[0], T0).unwrap();
    store
        .control_rollout(rec.id, Control::Pause, T0 + 1, |_| entry("p"))
        .unwrap();
    let (controlled, _) = store
        .control_rollout(rec.id, Control::Abort, T0 + 2, |_| entry("a"))
        .unwrap();
    assert_eq!(controlled.record.state, RolloutState::Aborted);
    assert_eq!(controlled.cancelled, Some((task, vec![nodes[0].clone()])));
    assert!(store.active_rollouts().unwrap().is_empty());
    assert_eq!(step(&store, rec.id, T0 + 100_000), Step::Idle);
    assert!(matches!(
        store.control_rollout(rec.id, Control::Abort, T0 + 3, |_| entry("a")),
        Err(StoreError::RolloutConflict { .. })
    ));
    assert!(matches!(
        store.control_rollout(99, Control::Abort, T0 + 3, |_| entry("a")),
        Err(StoreError::UnknownRollout(99))
    ));
    // Every step and control is in the audit log.
    let actions: Vec<String> = store
        .audit(0, 100)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["c", "rollout.step", "p", "a"]);
}

#[test]
fn a_rollout_with_no_matching_agent_is_refused_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    let new = new_rollout(vec![], None, 0);
    assert!(matches!(
        store.create_rollout(&new, T0, |_| entry("c")),
        Err(StoreError::NoTargets)
    ));
    assert!(store.rollouts().unwrap().is_empty());
    assert!(store.audit(0, 10).unwrap().is_empty());
}

#[test]
fn an_upgrade_rollout_counts_nodes_back_online_and_ends_the_ones_never_reached() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    fleet(&store, 4);
    let sha = "ab".repeat(32);
    let mut new = new_rollout(
        vec![
            stage("pilot", Size::Count(1)),
            stage("full", Size::Percent(100)),
        ],
        None,
        0,
    );
    new.action = RolloutAction::Upgrade(RolloutUpgrade {
        sha256: sha.clone(),
        version: "2.0.0".into(),
        deadline_ms: 60_000,
        os: None,
        arch: None,
    });
    new.auto_promote = true;
    new.pause_ms = 0;
    new.batch_timeout_ms = 10_000;
    // The artifact must have been uploaded.
    assert!(matches!(
        store.create_rollout(&new, T0, |_| entry("c")),
        Err(StoreError::UnknownArtifact(_))
    ));
    store
        .put_artifact(
            &ArtifactRecord {
                sha256: sha.clone(),
                size: 10,
                uploaded_at_ms: T0,
                actor: "ops".into(),
            },
            |_, _| entry("artifact.upload"),
        )
        .unwrap();
    let (rec, _) = store.create_rollout(&new, T0, |_| entry("c")).unwrap();
    let (upgrade, nodes) = match step(&store, rec.id, T0) {
        Step::Started {
            work: StartedWork::Upgrade(u),
            nodes,
        } => (u, nodes),
        other => panic!("{other:?}"),
    };
    assert_eq!((upgrade.version.as_str(), nodes.len()), ("2.0.0", 1));
    // The pilot's node registers with the new version: online, the batch succeeded.
    store
        .upgrades_at_register(&nodes[0], "2.0.0", T0 + 5)
        .unwrap();
    match step(&store, rec.id, T0 + 10) {
        Step::Finished { outcome, state, .. } => {
            assert_eq!((outcome.succeeded, outcome.failed), (1, 0));
            assert_eq!(state, RolloutState::Running);
        }
        other => panic!("{other:?}"),
    }
    // Full: three nodes, none ever registers again; at the deadline they count as failed
    // and their upgrade ends, so a late register does not start it behind the rollout.
    let (upgrade2, rest) = match step(&store, rec.id, T0 + 20) {
        Step::Started {
            work: StartedWork::Upgrade(u),
            nodes,
        } => (u, nodes),
        other => panic!("{other:?}"),
    };
    assert_eq!(rest.len(), 3);
    match step(&store, rec.id, T0 + 20 + 10_000) {
        Step::Finished { outcome, state, .. } => {
            assert_eq!((outcome.succeeded, outcome.unfinished), (0, 3));
            assert_eq!(state, RolloutState::Halted);
        }
        other => panic!("{other:?}"),
    }
    let (_, statuses) = store.upgrade(upgrade2.id).unwrap();
    assert!(
        statuses.iter().all(|n| n.state == UpgradeState::Failed),
        "{statuses:?}"
    );
    assert!(
        store
            .upgrades_at_register(&rest[0], "1.0.0", T0 + 50_000)
            .unwrap()
            .is_empty(),
        "nothing left to push"
    );
}

fn config_version(content: &str, activate: bool) -> NewConfigVersion {
    NewConfigVersion {
        name: "app.conf".into(),
        content: content.as_bytes().to_vec(),
        validate: None,
        reload: None,
        targets: Targets::Selector([("fleet".to_owned(), "edge".to_owned())].into()),
        actor: "ops".into(),
        activate,
    }
}

/// The agent's ack of `version` (with `sha256`) of app.conf.
fn config_ack(store: &Store, n: &UserId, version: u64, sha256: &str, ok: bool, at: u64) {
    let ack = ConfigAck {
        message_id: format!("m-{n}-{version}-{at}"),
        name: "app.conf".into(),
        version,
        sha256: sha256.into(),
        status: if ok {
            ConfigOutcome::Applied
        } else {
            ConfigOutcome::Failed
        },
        error: (!ok).then(|| "validate failed".into()),
        at_ms: at,
    };
    assert!(
        store
            .record_config_ack(&NewConfigAck {
                node_id: n,
                ack: &ack
            })
            .unwrap()
    );
}

/// What each node should run, by node id.
fn wanted(store: &Store) -> BTreeMap<String, (u64, ConfigState)> {
    store
        .config_status("app.conf")
        .unwrap()
        .1
        .into_iter()
        .map(|s| (s.node_id, (s.desired_version, s.state)))
        .collect()
}

#[test]
fn a_config_rollout_pins_batch_by_batch_and_its_version_becomes_desired_when_it_completes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    fleet(&store, 4);
    let (v1, nodes, _) = store
        .set_config(&config_version("a=1", true), T0, |_, _| entry("config.set"))
        .unwrap();
    assert_eq!(nodes.len(), 4);
    for n in &nodes {
        config_ack(&store, n, 1, &v1.sha256, true, T0 + 1);
    }
    // Staged: stored, not desired; nobody is asked to move.
    let (v2, _, _) = store
        .set_config(&config_version("a=2", false), T0 + 2, |_, _| {
            entry("config.set")
        })
        .unwrap();
    assert_eq!(store.config("app.conf").unwrap().unwrap().desired, 1);
    assert!(
        wanted(&store)
            .values()
            .all(|w| *w == (1, ConfigState::Applied))
    );

    let mut new = new_rollout(
        vec![
            stage("pilot", Size::Count(1)),
            stage("full", Size::Percent(100)),
        ],
        None,
        0,
    );
    new.action = RolloutAction::Config(RolloutConfig {
        name: "app.conf".into(),
        version: 2,
    });
    new.pause_ms = 0;
    new.batch_timeout_ms = 10_000;
    let (rec, _) = store.create_rollout(&new, T0 + 3, |_| entry("c")).unwrap();
    // While it runs, an operator's set or rollback would fight it: refused.
    assert!(matches!(
        store.set_config(&config_version("a=3", true), T0 + 4, |_, _| entry("config.set")),
        Err(StoreError::ConfigInRollout { rollout, .. }) if rollout == rec.id
    ));
    assert!(matches!(
        store.rollback_config("app.conf", 1, T0 + 4, |_, _| entry("config.rollback")),
        Err(StoreError::ConfigInRollout { .. })
    ));
    // A second rollout of the same document is refused too.
    assert!(matches!(
        store.create_rollout(&new, T0 + 4, |_| entry("c")),
        Err(StoreError::ConfigInRollout { .. })
    ));

    let (pushed, pilot) = match step(&store, rec.id, T0 + 5) {
        Step::Started {
            work: StartedWork::Config(v),
            nodes,
        } => (v, nodes),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (pushed.version, pushed.sha256.as_str(), pilot.len()),
        (2, v2.sha256.as_str(), 1)
    );
    // The pilot node wants 2, the others still 1.
    let w = wanted(&store);
    assert_eq!(w[pilot[0].as_str()], (2, ConfigState::Pending));
    assert_eq!(
        w.values()
            .filter(|x| **x == (1, ConfigState::Applied))
            .count(),
        3
    );
    // A node of the next stage that re-registers is converged to 1, not 2; the pilot to 2.
    let other = nodes.iter().find(|n| **n != pilot[0]).unwrap();
    let reported: BTreeMap<String, AppliedConfig> = [(
        "app.conf".to_owned(),
        AppliedConfig {
            version: 1,
            sha256: v1.sha256.clone(),
        },
    )]
    .into();
    assert!(
        store
            .configs_to_converge(&agent(other.as_str()), &reported, T0 + 6)
            .unwrap()
            .is_empty()
    );
    let lacking = store
        .configs_to_converge(&agent(pilot[0].as_str()), &reported, T0 + 6)
        .unwrap();
    assert_eq!(
        lacking.iter().map(|v| v.version).collect::<Vec<_>>(),
        vec![2]
    );
    // Not done until the pilot acks.
    assert_eq!(step(&store, rec.id, T0 + 7), Step::Idle);
    config_ack(&store, &pilot[0], 2, &v2.sha256, true, T0 + 8);
    match step(&store, rec.id, T0 + 9) {
        Step::Finished { outcome, state, .. } => {
            assert_eq!((outcome.succeeded, outcome.failed), (1, 0));
            assert_eq!(state, RolloutState::AwaitingPromotion);
        }
        other => panic!("{other:?}"),
    }
    store
        .control_rollout(rec.id, Control::Promote, T0 + 10, |_| entry("promote"))
        .unwrap();
    let rest = match step(&store, rec.id, T0 + 11) {
        Step::Started {
            work: StartedWork::Config(_),
            nodes,
        } => nodes,
        other => panic!("{other:?}"),
    };
    assert_eq!(rest.len(), 3);
    for n in &rest {
        config_ack(&store, n, 2, &v2.sha256, true, T0 + 12);
    }
    assert!(matches!(
        step(&store, rec.id, T0 + 13),
        Step::Finished {
            state: RolloutState::Completed,
            ..
        }
    ));
    // It covered every node: 2 is now the desired version, no pins left, all applied.
    assert_eq!(store.config("app.conf").unwrap().unwrap().desired, 2);
    assert!(
        wanted(&store)
            .values()
            .all(|w| *w == (2, ConfigState::Applied))
    );
    // And the operator may set and roll back again.
    store
        .rollback_config("app.conf", 1, T0 + 14, |_, _| entry("config.rollback"))
        .unwrap();
    assert!(wanted(&store).values().all(|w| w.0 == 1));
}

#[test]
fn a_config_rollout_halts_on_failed_acks_and_abort_sends_unfinished_nodes_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("s.redb")).unwrap();
    fleet(&store, 4);
    let (v1, nodes, _) = store
        .set_config(&config_version("a=1", true), T0, |_, _| entry("config.set"))
        .unwrap();
    for n in &nodes {
        config_ack(&store, n, 1, &v1.sha256, true, T0 + 1);
    }
    // The first version is desired at once; only later ones may be staged.
    let mut first = config_version("x", false);
    first.name = "other.conf".into();
    assert!(matches!(
        store.set_config(&first, T0, |_, _| entry("config.set")),
        Err(StoreError::InvalidConfig(_))
    ));
    let (v2, _, _) = store
        .set_config(&config_version("a=2", false), T0 + 2, |_, _| {
            entry("config.set")
        })
        .unwrap();
    let mut new = new_rollout(
        vec![stage("all", Size::Percent(100))],
        Some(Size::Count(2)),
        0,
    );
    new.action = RolloutAction::Config(RolloutConfig {
        name: "app.conf".into(),
        version: 2,
    });
    new.pause_ms = 0;
    // An unknown version is refused at creation.
    let mut bad = new.clone();
    bad.action = RolloutAction::Config(RolloutConfig {
        name: "app.conf".into(),
        version: 9,
    });
    assert!(matches!(
        store.create_rollout(&bad, T0 + 3, |_| entry("c")),
        Err(StoreError::UnknownConfigVersion { .. })
    ));
    let (rec, _) = store.create_rollout(&new, T0 + 3, |_| entry("c")).unwrap();
    let batch = match step(&store, rec.id, T0 + 4) {
        Step::Started { nodes, .. } => nodes,
        other => panic!("{other:?}"),
    };
    assert_eq!(batch.len(), 2);
    // One node's validate fails: over a 0% threshold, halted while the other is pending.
    config_ack(&store, &batch[0], 2, &v2.sha256, false, T0 + 5);
    assert!(matches!(step(&store, rec.id, T0 + 6), Step::Halted(_)));
    let w = wanted(&store);
    assert_eq!(w[batch[0].as_str()], (2, ConfigState::Failed));
    assert_eq!(w[batch[1].as_str()], (2, ConfigState::Pending));
    // Abort: the nodes that do not run 2 go back to the desired 1 (the failed one never
    // replaced its file), nodes that run 2 would keep it; desired stays 1.
    store
        .control_rollout(rec.id, Control::Abort, T0 + 7, |_| entry("abort"))
        .unwrap();
    assert_eq!(store.config("app.conf").unwrap().unwrap().desired, 1);
    let w = wanted(&store);
    assert_eq!(w[batch[0].as_str()], (1, ConfigState::Applied));
    assert_eq!(w[batch[1].as_str()], (1, ConfigState::Applied));
    assert!(w.values().all(|x| x.0 == 1));
    // Over: the document may be set again.
    store
        .set_config(&config_version("a=3", true), T0 + 8, |_, _| {
            entry("config.set")
        })
        .unwrap();
}

#[test]
fn a_config_rollout_over_a_subset_leaves_its_nodes_pinned_and_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let (rec, v2sha, subset) = {
        let store = Store::open(&path).unwrap();
        fleet(&store, 4);
        store
            .set_config(&config_version("a=1", true), T0, |_, _| entry("config.set"))
            .unwrap();
        let (v2, _, _) = store
            .set_config(&config_version("a=2", false), T0 + 1, |_, _| {
                entry("config.set")
            })
            .unwrap();
        let mut new = new_rollout(vec![stage("all", Size::Percent(100))], None, 0);
        new.action = RolloutAction::Config(RolloutConfig {
            name: "app.conf".into(),
            version: 2,
        });
        new.targets = Targets::Nodes(vec![node("n000"), node("n001")]);
        let (rec, _) = store.create_rollout(&new, T0 + 2, |_| entry("c")).unwrap();
        let subset = match step(&store, rec.id, T0 + 3) {
            Step::Started { nodes, .. } => nodes,
            other => panic!("{other:?}"),
        };
        (rec, v2.sha256, subset)
    };
    // A standby opens the same file: the batch is in flight, the pins are on disk.
    let store = Store::open(&path).unwrap();
    assert_eq!(step(&store, rec.id, T0 + 4), Step::Idle);
    for n in &subset {
        config_ack(&store, n, 2, &v2sha, true, T0 + 5);
    }
    assert!(matches!(
        step(&store, rec.id, T0 + 6),
        Step::Finished {
            state: RolloutState::Completed,
            ..
        }
    ));
    // Two of four nodes: desired stays 1, the two keep 2.
    assert_eq!(store.config("app.conf").unwrap().unwrap().desired, 1);
    let w = wanted(&store);
    assert_eq!(w["n000"], (2, ConfigState::Applied));
    assert_eq!(w["n001"], (2, ConfigState::Applied));
    assert_eq!(w["n002"].0, 1);
    assert_eq!(w["n003"].0, 1);
}
