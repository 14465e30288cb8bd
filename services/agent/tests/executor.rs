//! The execution policy with real processes and real sockets: program lookup on the
//! configured search path (not the agent's `PATH`), the environment allowlist, `cwd`
//! roots, the timeout and concurrency caps, probe address rules and CRLF refusal, and the
//! process-group kill without a `kill` program.
//!
//! Two tests need the agent process itself to have a hostile or minimal `PATH`. Setting
//! the environment of this process is not possible without `unsafe` (and racy under the
//! parallel runner), so they run an ignored test of this binary as a child process with
//! the `PATH` they need.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agent::executor::{self, ExecEvent, Execution, Executor};
use agent::{AgentMetrics, ExecPolicy, Outbox};
use messages::fleet::{Outcome, Task, TaskKind, TaskResult};
use messages::payload::from_bus;
use tokio::sync::{mpsc, oneshot};

/// Bound on every wait in this file.
const WAIT: Duration = Duration::from_secs(15);

/// Set in a child test's environment: the directory its test works in.
const CHILD_DIR_VAR: &str = "AGENT_EXECUTOR_TEST_DIR";

fn command(argv: &[&str]) -> TaskKind {
    command_in(argv, &[], None)
}

fn command_in(argv: &[&str], env: &[(&str, &str)], cwd: Option<&Path>) -> TaskKind {
    TaskKind::Command {
        argv: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        cwd: cwd.map(|p| p.to_str().unwrap().to_owned()),
    }
}

async fn exec(policy: &ExecPolicy, spec: TaskKind) -> Execution {
    exec_for(policy, spec, Duration::from_secs(10)).await
}

async fn exec_for(policy: &ExecPolicy, spec: TaskKind, timeout: Duration) -> Execution {
    let (_cancel, rx) = oneshot::channel();
    tokio::time::timeout(WAIT, executor::execute(&spec, policy, timeout, rx))
        .await
        .expect("the task ended")
}

/// Asserts `e` is a refusal whose reason mentions every one of `words`.
#[track_caller]
fn assert_refused(e: &Execution, words: &[&str]) {
    assert_eq!(e.outcome, Outcome::Failed, "{e:?}");
    let error = e.error.as_deref().unwrap_or_default();
    assert!(error.starts_with("refused: "), "{e:?}");
    for w in words {
        assert!(error.contains(w), "{w:?} not in {error:?}");
    }
    assert_eq!(e.exit_code, None, "nothing ran: {e:?}");
}

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Where a program is on the default search path (the test machine's `sh`, `sleep`...).
fn system_program(name: &str) -> PathBuf {
    ExecPolicy::with_commands([name])
        .resolve_program(name)
        .unwrap()
}

/// Runs the ignored test `name` of this binary as a child process with exactly `path` as
/// its `PATH` (and nothing else inherited but `dir` in [`CHILD_DIR_VAR`]).
fn run_child_test(name: &str, path: &str, dir: &Path) {
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_clear()
        .env("PATH", path)
        .env(CHILD_DIR_VAR, dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("1 passed"), "{name} did not run:\n{stdout}");
}

// ---- program lookup ---------------------------------------------------------------------

/// The agent's own `PATH` starts with a directory holding a fake `tool` (and a fake `sh`);
/// the configured search path has the real `tool`. The configured one runs, and a
/// command's `sh -c` finds programs on the search path too.
#[test]
fn argv0_is_resolved_on_the_configured_path_not_the_agents() {
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil");
    let good = dir.path().join("good");
    std::fs::create_dir_all(&evil).unwrap();
    std::fs::create_dir_all(&good).unwrap();
    script(&evil, "tool", "echo evil");
    script(&evil, "sh", "echo evil sh");
    script(&good, "tool", "echo good");
    std::os::unix::fs::symlink(system_program("sh"), good.join("sh")).unwrap();
    let path = format!(
        "{}:{}",
        evil.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run_child_test("child_resolves_on_the_configured_path", &path, dir.path());
}

#[tokio::test]
#[ignore = "child process of argv0_is_resolved_on_the_configured_path_not_the_agents"]
async fn child_resolves_on_the_configured_path() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR).map(PathBuf::from) else {
        return;
    };
    let (evil, good) = (dir.join("evil"), dir.join("good"));
    // The premise: this process would find the fake tool first.
    let own_path = std::env::var("PATH").unwrap();
    assert!(own_path.starts_with(evil.to_str().unwrap()), "{own_path}");

    let policy = ExecPolicy {
        search_path: vec![good.clone()],
        ..ExecPolicy::with_commands(["tool", "sh"])
    };
    let e = exec(&policy, command(&["tool"])).await;
    assert_eq!(
        (e.outcome, e.stdout_tail.as_str()),
        (Outcome::Succeeded, "good\n"),
        "{e:?}"
    );
    // Inside the command, PATH is the search path as well.
    let e = exec(&policy, command(&["sh", "-c", "tool; echo \"$PATH\""])).await;
    assert_eq!(
        e.stdout_tail,
        format!("good\n{}\n", good.display()),
        "{e:?}"
    );

    // Allowed but not on the search path: refused, even though the agent's PATH has it.
    let policy = ExecPolicy {
        search_path: vec![dir.join("empty")],
        ..ExecPolicy::with_commands(["tool"])
    };
    let e = exec(&policy, command(&["tool"])).await;
    assert_refused(&e, &["\"tool\"", "command_search_path"]);
}

#[tokio::test]
async fn bare_and_absolute_entries_match_exactly_and_relative_paths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let tool = script(&bin, "tool", "echo ran \"$@\"");
    let tool_abs = tool.to_str().unwrap();
    // Not executable: skipped by the lookup.
    std::fs::write(bin.join("data"), "x").unwrap();

    // A bare entry runs the resolved file and allows no path spelling of it.
    let policy = ExecPolicy {
        search_path: vec![dir.path().join("missing"), bin.clone()],
        ..ExecPolicy::with_commands(["tool", "data"])
    };
    let e = exec(&policy, command(&["tool", "a b"])).await;
    assert_eq!(e.stdout_tail, "ran a b\n", "{e:?}");
    assert_refused(
        &exec(&policy, command(&[tool_abs])).await,
        &["not on allowed_commands"],
    );
    assert_refused(
        &exec(&policy, command(&["data"])).await,
        &["not in command_search_path"],
    );

    // An absolute entry matches only that argv[0].
    let policy = ExecPolicy {
        search_path: vec![bin.clone()],
        ..ExecPolicy::with_commands([tool_abs])
    };
    assert_eq!(
        exec(&policy, command(&[tool_abs])).await.stdout_tail,
        "ran\n"
    );
    assert_refused(
        &exec(&policy, command(&["tool"])).await,
        &["not on allowed_commands"],
    );

    // A relative argv[0] with a slash is refused before the allowlist is consulted, even
    // when (bypassing config validation) the allowlist spells it the same way.
    let policy = ExecPolicy {
        search_path: vec![bin.clone()],
        allowed_cwd_roots: vec![dir.path().to_owned()],
        ..ExecPolicy::with_commands(["./tool", "bin/tool", "tool"])
    };
    for argv0 in ["./tool", "bin/tool", "../bin/tool", ".", ""] {
        let e = exec(&policy, command_in(&[argv0], &[], Some(&bin))).await;
        assert_refused(&e, &["must be a bare name or an absolute path"]);
    }
    assert_refused(&exec(&policy, command(&[])).await, &["empty argv"]);
}

// ---- environment ------------------------------------------------------------------------

#[tokio::test]
async fn the_environment_is_cleared_and_only_allowed_names_reach_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let policy = ExecPolicy {
        allowed_env: BTreeSet::from(["GREETING".to_owned()]),
        ..ExecPolicy::with_commands(["env", "sh"])
    };
    // Exactly the base plus the allowed variable: nothing of the agent's own environment
    // (HOME, CARGO_*, ...) leaks in.
    let e = exec(&policy, command_in(&["env"], &[("GREETING", "hi")], None)).await;
    assert_eq!(e.outcome, Outcome::Succeeded, "{e:?}");
    let mut lines: Vec<&str> = e.stdout_tail.lines().collect();
    lines.sort_unstable();
    let path = format!("PATH={}", policy.path_var());
    assert_eq!(lines, ["GREETING=hi", "LANG=C.UTF-8", path.as_str()]);

    // Forbidden names are refused whole, before anything runs: never silently dropped.
    let touch = format!("echo x > {}", marker.display());
    for (name, value) in [
        ("LD_PRELOAD", "/tmp/evil.so"),
        ("LD_LIBRARY_PATH", "/tmp"),
        ("PATH", "/tmp/evil"),
        ("BASH_ENV", "/tmp/evil.sh"),
        ("DYLD_INSERT_LIBRARIES", "/tmp/evil.dylib"),
    ] {
        let e = exec(
            &policy,
            command_in(
                &["sh", "-c", &touch],
                &[(name, value), ("GREETING", "hi")],
                None,
            ),
        )
        .await;
        assert_refused(&e, &[name, "may never be set"]);
    }
    // Not on the allowlist.
    let e = exec(
        &policy,
        command_in(&["sh", "-c", &touch], &[("OTHER", "1")], None),
    )
    .await;
    assert_refused(&e, &["\"OTHER\"", "allowed_env"]);
    assert!(!marker.exists(), "a refused command ran");

    // A policy that lists a loader variable anyway (config validation rejects it; the
    // executor does not rely on that).
    let lax = ExecPolicy {
        allowed_env: BTreeSet::from(["LD_PRELOAD".to_owned(), "PATH".to_owned()]),
        ..policy.clone()
    };
    for name in ["LD_PRELOAD", "PATH"] {
        let e = exec(
            &lax,
            command_in(&["sh", "-c", &touch], &[(name, "/tmp")], None),
        )
        .await;
        assert_refused(&e, &[name, "may never be set"]);
    }
    assert!(!marker.exists(), "a refused command ran");
}

// ---- working directory ------------------------------------------------------------------

#[tokio::test]
async fn cwd_must_resolve_under_an_allowed_root() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let work = root.join("work");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    std::os::unix::fs::symlink(&work, dir.path().join("into-work")).unwrap();
    std::fs::write(root.join("file"), "x").unwrap();
    let pwd = ["sh", "-c", "pwd"];

    // No roots configured: a task may not choose its directory, and runs in `/`.
    let closed = ExecPolicy::with_commands(["sh"]);
    assert_refused(
        &exec(&closed, command_in(&pwd, &[], Some(&work))).await,
        &["allowed_cwd_roots is empty"],
    );
    assert_eq!(exec(&closed, command(&pwd)).await.stdout_tail, "/\n");

    let policy = ExecPolicy {
        allowed_cwd_roots: vec![root.clone()],
        ..closed
    };
    let canonical_work = std::fs::canonicalize(&work).unwrap();
    for inside in [
        work.clone(),
        root.join("work/../work"),
        dir.path().join("into-work"),
    ] {
        let e = exec(&policy, command_in(&pwd, &[], Some(&inside))).await;
        assert_eq!(e.outcome, Outcome::Succeeded, "{inside:?}: {e:?}");
        // It runs in the resolved directory.
        assert_eq!(e.stdout_tail, format!("{}\n", canonical_work.display()));
    }
    for escape in [
        outside.clone(),
        root.join("escape"),
        root.join("work/../.."),
    ] {
        let e = exec(&policy, command_in(&pwd, &[], Some(&escape))).await;
        assert_refused(&e, &["outside allowed_cwd_roots"]);
    }
    for (bad, why) in [
        (root.join("missing"), "No such file"),
        (root.join("file"), "not a directory"),
        (PathBuf::from("root/work"), "must be an absolute path"),
    ] {
        let e = exec(&policy, command_in(&pwd, &[], Some(&bad))).await;
        assert_refused(&e, &[why]);
    }
}

// ---- caps -------------------------------------------------------------------------------

struct Harness {
    executor: Executor,
    events: mpsc::UnboundedReceiver<ExecEvent>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(policy: ExecPolicy) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Arc::new(Outbox::open(dir.path().join("outbox.redb")).unwrap());
        let (tx, events) = mpsc::unbounded_channel();
        let executor = Executor::new(policy, outbox, tx, Arc::new(AgentMetrics::default()));
        Harness {
            executor,
            events,
            _dir: dir,
        }
    }

    fn start(&self, task_id: u64, spec: TaskKind, timeout_ms: u64) {
        self.executor.start(Task {
            task_id,
            attempt: 1,
            spec,
            timeout_ms,
        });
    }

    /// The next event, skipping status events.
    async fn next(&mut self) -> ExecEvent {
        loop {
            let event = tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("an executor event")
                .expect("the executor is alive");
            if !matches!(
                event,
                ExecEvent::Status(_) | ExecEvent::Report { .. } | ExecEvent::Output(_)
            ) {
                return event;
            }
        }
    }

    async fn started(&mut self, task_id: u64) {
        match self.next().await {
            ExecEvent::Started(s) if s.task_id == task_id => {}
            other => panic!("expected task {task_id} to start, got {other:?}"),
        }
    }

    async fn result(&mut self, task_id: u64) -> TaskResult {
        match self.next().await {
            ExecEvent::Finished { payload, .. } => {
                let result: TaskResult = from_bus(&payload).unwrap();
                assert_eq!(result.task_id, task_id, "{result:?}");
                result
            }
            other => panic!("expected the result of task {task_id}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn timeouts_above_the_cap_and_tasks_beyond_the_concurrency_cap_are_refused() {
    let mut h = Harness::new(ExecPolicy {
        max_concurrent_tasks: 2,
        max_timeout: Duration::from_secs(60),
        ..ExecPolicy::with_commands(["sleep", "echo"])
    });

    // Above the timeout cap: refused without starting.
    h.start(1, command(&["echo", "x"]), 60_001);
    let r = h.result(1).await;
    assert_eq!(r.outcome, Outcome::Failed, "{r:?}");
    assert_eq!(
        r.error.as_deref(),
        Some("refused: timeout_ms 60001 is above max_timeout_ms 60000")
    );
    // At the cap it runs.
    h.start(2, command(&["echo", "x"]), 60_000);
    h.started(2).await;
    assert_eq!(h.result(2).await.outcome, Outcome::Succeeded);

    // Two running: a third is refused at once, and the two keep running.
    h.start(3, command(&["sleep", "300"]), 60_000);
    h.started(3).await;
    h.start(4, command(&["sleep", "300"]), 60_000);
    h.started(4).await;
    h.start(5, command(&["echo", "x"]), 60_000);
    let r = h.result(5).await;
    assert_eq!(
        r.error.as_deref(),
        Some("refused: 2 tasks are already running (max_concurrent_tasks)"),
        "{r:?}"
    );
    let mut running = h.executor.running();
    running.sort_unstable();
    assert_eq!(running, [3, 4]);

    // A slot frees up when a task ends.
    assert!(h.executor.cancel(3));
    assert_eq!(h.result(3).await.outcome, Outcome::Cancelled);
    h.start(6, command(&["echo", "x"]), 60_000);
    h.started(6).await;
    assert_eq!(h.result(6).await.outcome, Outcome::Succeeded);
    assert!(h.executor.cancel(4));
    assert_eq!(h.result(4).await.outcome, Outcome::Cancelled);
}

// ---- probes -----------------------------------------------------------------------------

/// A listener that answers every request with 204 and counts connections.
struct Http {
    addr: std::net::SocketAddr,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

async fn http_server() -> Http {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        }
    });
    Http { addr, accepted }
}

impl Http {
    fn connections(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

fn http(url: impl Into<String>) -> TaskKind {
    TaskKind::HttpProbe { url: url.into() }
}

fn tcp(target: impl Into<String>) -> TaskKind {
    TaskKind::TcpProbe {
        target: target.into(),
    }
}

#[tokio::test]
async fn probes_refuse_crlf_and_other_control_characters() {
    let server = http_server().await;
    let policy = ExecPolicy::default();
    let ok = exec(&policy, http(format!("http://{}/health", server.addr))).await;
    assert_eq!(
        (ok.outcome, ok.http_status),
        (Outcome::Succeeded, Some(204)),
        "{ok:?}"
    );
    assert_eq!(server.connections(), 1);

    let addr = server.addr;
    let port = addr.port();
    for url in [
        format!("http://{addr}/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /"),
        format!("http://{addr}/x\r\nHost: evil"),
        format!("http://{addr}/x\nX: y"),
        format!("http://127.0.0.1\r\nX: y:{port}/"),
        format!("http://{addr}/\t"),
        format!("http://{addr}/ä"),
        format!("http://{addr}/\u{7f}"),
    ] {
        let e = exec(&policy, http(url.clone())).await;
        assert_refused(&e, &["whitespace, control or non-ASCII"]);
    }
    for target in [
        format!("{addr}\r\n"),
        format!("127.0.0.1\n:{port}"),
        format!(" {addr}"),
    ] {
        let e = exec(&policy, tcp(target)).await;
        assert_refused(&e, &["whitespace, control or non-ASCII"]);
    }
    // Characters that are printable but not a host are a plain failure, also unconnected.
    let e = exec(&policy, http(format!("http://a%0d%0ab:{port}/"))).await;
    assert_eq!(e.outcome, Outcome::Failed);
    assert_eq!(server.connections(), 1, "no refused probe connected");
}

#[tokio::test]
async fn probes_refuse_link_local_and_metadata_addresses_by_default() {
    let policy = ExecPolicy::default();
    for (target, range) in [
        ("169.254.169.254:80", "169.254.0.0/16"),
        ("169.254.1.2:8080", "169.254.0.0/16"),
        ("[::ffff:169.254.169.254]:80", "169.254.0.0/16"),
        ("[fe80::1]:80", "fe80::/10"),
        ("[fd00:ec2::254]:80", "fd00:ec2::254/128"),
        ("100.100.100.200:80", "100.100.100.200/32"),
    ] {
        let e = exec(&policy, tcp(target)).await;
        assert_refused(&e, &[range, "built-in deny list"]);
        let e = exec(&policy, http(format!("http://{target}/latest/meta-data/"))).await;
        assert_refused(&e, &[range, "built-in deny list"]);
    }
}

#[tokio::test]
async fn probe_allow_and_deny_lists_decide_by_the_most_specific_range() {
    let server = http_server().await;
    let port = server.addr.port();
    let url = format!("http://{}/", server.addr);

    // Loopback is reachable by default.
    let e = exec(&ExecPolicy::default(), http(url.clone())).await;
    assert_eq!(e.outcome, Outcome::Succeeded, "{e:?}");

    // Denied: by address, and by name (the resolved address is what is checked).
    let deny = ExecPolicy {
        probe_deny: vec!["127.0.0.0/8".parse().unwrap(), "::1".parse().unwrap()],
        ..ExecPolicy::default()
    };
    let before = server.connections();
    assert_refused(
        &exec(&deny, http(url.clone())).await,
        &["127.0.0.0/8", "probe_deny"],
    );
    assert_refused(
        &exec(&deny, tcp(server.addr.to_string())).await,
        &["probe_deny"],
    );
    assert_refused(
        &exec(&deny, http(format!("http://localhost:{port}/"))).await,
        &["probe_deny"],
    );
    assert_eq!(server.connections(), before, "a denied probe connected");

    // A more specific allow inside the denied range wins.
    let allow_one = ExecPolicy {
        probe_allow: vec!["127.0.0.1/32".parse().unwrap()],
        ..deny.clone()
    };
    let e = exec(&allow_one, http(url.clone())).await;
    assert_eq!(e.outcome, Outcome::Succeeded, "{e:?}");
    let e = exec(&allow_one, tcp(server.addr.to_string())).await;
    assert_eq!(e.outcome, Outcome::Succeeded, "{e:?}");

    // probe_allow lifts the built-in deny for the metadata address: the probe is tried
    // (whatever the network here makes of it), not refused.
    let metadata = ExecPolicy {
        probe_allow: vec!["169.254.169.254".parse().unwrap()],
        ..ExecPolicy::default()
    };
    let e = exec_for(
        &metadata,
        tcp("169.254.169.254:80"),
        Duration::from_millis(500),
    )
    .await;
    assert!(
        !e.error
            .as_deref()
            .unwrap_or_default()
            .starts_with("refused"),
        "{e:?}"
    );
    // ...and only that address.
    let e = exec(&metadata, tcp("169.254.169.253:80")).await;
    assert_refused(&e, &["built-in deny list"]);
}

// ---- process-group kill -----------------------------------------------------------------

/// The agent runs with a `PATH` holding only `sh` and `sleep` (no `kill` anywhere): a
/// timed-out or cancelled command's whole process group still dies.
#[test]
fn the_process_group_is_killed_without_a_kill_program() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for name in ["sh", "sleep"] {
        std::os::unix::fs::symlink(system_program(name), bin.join(name)).unwrap();
    }
    run_child_test(
        "child_kills_the_group_without_kill",
        bin.to_str().unwrap(),
        dir.path(),
    );
}

#[tokio::test]
#[ignore = "child process of the_process_group_is_killed_without_a_kill_program"]
async fn child_kills_the_group_without_kill() {
    let Some(dir) = std::env::var_os(CHILD_DIR_VAR).map(PathBuf::from) else {
        return;
    };
    let bin = dir.join("bin");
    // The premise: no `kill` program is reachable, by this process or by the command.
    let own_path = std::env::var("PATH").unwrap();
    assert_eq!(own_path, bin.to_str().unwrap());
    assert!(std::env::split_paths(&own_path).all(|d| !d.join("kill").exists()));
    let policy = ExecPolicy {
        search_path: vec![bin],
        ..ExecPolicy::with_commands(["sh"])
    };
    let kill_check = ExecPolicy {
        search_path: policy.search_path.clone(),
        ..ExecPolicy::with_commands(["kill"])
    };
    assert!(kill_check.resolve_program("kill").is_err());

    // Cancelled once the grandchild is known to run.
    let pids = dir.join("cancel");
    std::fs::create_dir(&pids).unwrap();
    let script = tree_script(&pids);
    let (cancel, rx) = oneshot::channel();
    let spec = command(&["sh", "-c", &script]);
    let task_policy = policy.clone();
    let task = tokio::spawn(async move {
        executor::execute(&spec, &task_policy, Duration::from_secs(300), rx).await
    });
    let (leader, grandchild) = wait_pids(&pids).await;
    assert!(
        alive_in_group(grandchild, leader),
        "the grandchild runs before the cancel"
    );
    cancel.send(()).unwrap();
    let e = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert_eq!(e.outcome, Outcome::Cancelled, "{e:?}");
    wait_gone(grandchild, leader).await;
    wait_gone(leader, leader).await;

    // Timed out (the timeout is long next to the microseconds the shell needs to write
    // its pids; the test does not depend on when exactly it fires).
    let pids = dir.join("timeout");
    std::fs::create_dir(&pids).unwrap();
    let e = exec_for(
        &policy,
        command(&["sh", "-c", &tree_script(&pids)]),
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(e.outcome, Outcome::TimedOut, "{e:?}");
    let (leader, grandchild) = wait_pids(&pids).await;
    wait_gone(grandchild, leader).await;
    wait_gone(leader, leader).await;
}

/// A shell that starts a background `sleep` (the grandchild), writes both pids (with
/// builtins only: `sh` and `sleep` are all there is) and waits.
fn tree_script(pids: &Path) -> String {
    let d = pids.display();
    format!("sleep 300 & echo $! > {d}/grandchild; echo $$ > {d}/leader; wait")
}

/// The leader's and the grandchild's pids, once both are written (an empty file, just
/// created, reads as not yet written).
async fn wait_pids(pids: &Path) -> (u32, u32) {
    let read = |name: &str| -> Option<u32> {
        std::fs::read_to_string(pids.join(name))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let (Some(l), Some(g)) = (read("leader"), read("grandchild")) {
            return (l, g);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no pids in {pids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether `pid` is a live (not zombie) process in process group `pgid`.
fn alive_in_group(pid: u32, pgid: u32) -> bool {
    let stat = match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat,
        Err(e) if e.kind() == ErrorKind::NotFound => return false,
        Err(e) => panic!("/proc/{pid}/stat: {e}"),
    };
    // "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after the ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first().copied().unwrap_or_default();
    let pgrp: u32 = fields.get(2).and_then(|p| p.parse().ok()).unwrap_or(0);
    // A zombie is dead (only not yet reaped by whoever inherited it); another group means
    // the pid was reused.
    state != "Z" && state != "X" && pgrp == pgid
}

async fn wait_gone(pid: u32, pgid: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while alive_in_group(pid, pgid) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "process {pid} of group {pgid} survived the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
