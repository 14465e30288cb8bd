//! Task execution: commands, TCP probes and HTTP probes, with timeouts and cancellation.
//!
//! This module owns what happens between "a task arrived" and "its result is durable": it
//! announces the start, runs the task, writes the [`TaskResult`] to the outbox (with the
//! entry's own message id inside it) and only then hands it to the connection loop to
//! send. The order matters: a result that was sent but not yet written could be lost by a
//! crash after the scheduler missed it, while a written result is replayed until acked.
//!
//! Every task is first checked against the [`ExecPolicy`] (program, environment, working
//! directory, timeout and concurrency caps, probe destinations; see [`crate::policy`]); a
//! refusal is reported as a failed result whose error starts with `refused:`, without
//! running anything. Commands run from a cleared environment, by the absolute path the
//! policy resolved, in their own process group, so a timeout or cancel kills everything the
//! command started (shell pipelines, grandchildren), not just the direct child. The group
//! is killed with the `kill(2)` system call through `rustix` (safe code; no `kill` program
//! is needed, which minimal images such as the compose one do not have).
//!
//! Probes resolve their target once, check every resolved address against the policy and
//! connect to a checked address, so a name cannot be re-resolved to a denied one between
//! the check and the connection (DNS rebinding). The HTTP probe refuses URLs with
//! whitespace, control or non-ASCII characters, so nothing in a URL can add a header.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use servicekit::clock::now_ms;

use messages::fleet::{Outcome, Stream, Task, TaskKind, TaskOutput, TaskResult, TaskStarted};
use messages::payload::{self, PayloadError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::agent_metrics::AgentMetrics;
use crate::outbox::{Outbox, OutboxError};
use crate::output::{AttemptOutput, OutputQueue, read_stream};
use crate::policy::{ExecPolicy, Prepared, Refusal, check_probe_text, is_probe_host};

/// How much of each output stream a result keeps (the end of it, where errors usually are).
pub const TAIL_BYTES: usize = 4 * 1024;

/// The outbox entry kind of a task result.
pub const RESULT_KIND: &str = "result";

pub use crate::policy::DEFAULT_TIMEOUT;

/// After a command exits, how long to wait for its output pipes to close before killing
/// whatever else in its process group still holds them.
const PIPE_DRAIN: Duration = Duration::from_secs(1);

/// Longest wait for reaping a killed child.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Largest HTTP response head the HTTP probe reads to find the status line.
const HTTP_HEAD_MAX: usize = 8 * 1024;

/// What the executor tells the connection loop.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecEvent {
    /// A task began; sent best effort (not outboxed).
    Started(TaskStarted),
    /// A result was durably written to the outbox as entry `seq`; `payload` is the
    /// msgpack [`TaskResult`] to send on `agent.task.result`.
    Finished {
        /// The task the result belongs to (its trace is looked up by it).
        task_id: u64,
        /// The outbox sequence (the connection loop uses it to avoid sending an entry twice
        /// in one session when a replay already sent it).
        seq: u64,
        /// The encoded result.
        payload: Vec<u8>,
    },
    /// A status report was durably written to the outbox as entry `seq`; `payload` is the
    /// msgpack [`messages::fleet::Report`].
    Report {
        /// The outbox sequence.
        seq: u64,
        /// The encoded report.
        payload: Vec<u8>,
    },
    /// The agent's health changed (online <-> degraded); sent best effort and again after
    /// every reconnect.
    Status(messages::fleet::Status),
    /// A chunk of a running command's output (best effort; see [`crate::output`]). The
    /// loop calls [`OutputQueue::taken`] for each.
    Output(TaskOutput),
    /// A config ack was durably written to the outbox as entry `seq`; `payload` is the
    /// msgpack [`messages::fleet::ConfigAck`] to send on `agent.config.ack`.
    ConfigAck {
        /// The outbox sequence.
        seq: u64,
        /// The encoded ack.
        payload: Vec<u8>,
    },
    /// An upgrade report was durably written to the outbox as entry `seq`; `payload` is
    /// the msgpack [`messages::fleet::UpgradeResult`] to send on `agent.upgrade.result`.
    UpgradeResult {
        /// The outbox sequence.
        seq: u64,
        /// The encoded report.
        payload: Vec<u8>,
    },
    /// A new binary is installed: the connection loop stops so the process can hand over
    /// to it ([`crate::upgrade::hand_over`]).
    UpgradeInstalled,
}

/// Why a result could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The outbox refused the write.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The result could not be encoded.
    #[error("cannot encode the result: {0}")]
    Encode(#[from] PayloadError),
    /// The blocking outbox task did not complete.
    #[error("outbox write did not complete: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How a task ended, before it is stamped with ids and written to the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Execution {
    /// Outcome.
    pub outcome: Outcome,
    /// Exit code of a command that exited normally.
    pub exit_code: Option<i32>,
    /// Last [`TAIL_BYTES`] of stdout, lossy UTF-8.
    pub stdout_tail: String,
    /// Last [`TAIL_BYTES`] of stderr, lossy UTF-8.
    pub stderr_tail: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// Probe latency or command duration.
    pub latency_ms: Option<u64>,
    /// Status of an HTTP probe.
    pub http_status: Option<u16>,
    /// Live output chunks cut (sent or not).
    pub output_chunks: u64,
}

impl Execution {
    fn new(outcome: Outcome) -> Self {
        Execution {
            outcome,
            exit_code: None,
            stdout_tail: String::new(),
            stderr_tail: String::new(),
            error: None,
            latency_ms: None,
            http_status: None,
            output_chunks: 0,
        }
    }

    fn failed(outcome: Outcome, error: impl Into<String>) -> Self {
        Execution {
            error: Some(error.into()),
            ..Execution::new(outcome)
        }
    }

    /// A task the policy does not allow: failed, with the reason after `refused: `.
    pub fn refused(why: &Refusal) -> Self {
        Execution::failed(Outcome::Failed, format!("refused: {why}"))
    }

    /// The wire result for `task`, with an empty message id (the outbox fills it in).
    pub fn into_result(self, task: &Task) -> TaskResult {
        TaskResult {
            message_id: String::new(),
            task_id: task.task_id,
            attempt: task.attempt,
            outcome: self.outcome,
            exit_code: self.exit_code,
            stdout_tail: self.stdout_tail,
            stderr_tail: self.stderr_tail,
            error: self.error,
            latency_ms: self.latency_ms,
            http_status: self.http_status,
            finished_at_ms: now_ms(),
            output_chunks: self.output_chunks,
        }
    }
}

/// Runs tasks in the background and reports through an event channel. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    policy: ExecPolicy,
    outbox: Arc<Outbox>,
    events: mpsc::UnboundedSender<ExecEvent>,
    /// Live output chunks, into `events`.
    output: OutputQueue,
    /// Counts started and finished tasks.
    metrics: Arc<AgentMetrics>,
    /// Running tasks by id, with the sender that cancels each.
    running: Mutex<HashMap<u64, oneshot::Sender<()>>>,
}

impl Executor {
    /// An executor running what `policy` allows, storing results in `outbox`, reporting
    /// on `events` and counting tasks in `metrics`.
    pub fn new(
        policy: ExecPolicy,
        outbox: Arc<Outbox>,
        events: mpsc::UnboundedSender<ExecEvent>,
        metrics: Arc<AgentMetrics>,
    ) -> Self {
        Executor {
            inner: Arc::new(Inner {
                policy,
                outbox,
                output: OutputQueue::new(events.clone()),
                events,
                metrics,
                running: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts `task` in the background. A task id that is already running is ignored: the
    /// scheduler may redeliver a task after a reconnect, and running it twice would be worse
    /// than reporting it once. With `max_concurrent_tasks` tasks already running, the task
    /// is refused (a result, not a queue entry).
    pub fn start(&self, task: Task) {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        {
            let Ok(mut running) = self.inner.running.lock() else {
                tracing::error!(task_id = task.task_id, "Task table poisoned; task dropped.");
                return;
            };
            if running.contains_key(&task.task_id) {
                tracing::info!(task_id = task.task_id, "Task already running; ignored.");
                return;
            }
            if running.len() >= self.inner.policy.max_concurrent_tasks {
                let why = Refusal::Busy(running.len());
                drop(running);
                let this = self.clone();
                tokio::spawn(async move { this.finish(&task, Execution::refused(&why)).await });
                return;
            }
            running.insert(task.task_id, cancel_tx);
        }
        let this = self.clone();
        tokio::spawn(async move { this.run(task, cancel_rx).await });
    }

    /// Cancels the running task `task_id`; `false` if no such task is running.
    pub fn cancel(&self, task_id: u64) -> bool {
        let sender = self
            .inner
            .running
            .lock()
            .ok()
            .and_then(|mut running| running.remove(&task_id));
        match sender {
            Some(sender) => sender.send(()).is_ok(),
            None => false,
        }
    }

    /// The queue live output goes through (the connection loop reports what it takes).
    pub fn output(&self) -> &OutputQueue {
        &self.inner.output
    }

    /// Ids of the tasks currently running.
    pub fn running(&self) -> Vec<u64> {
        self.inner
            .running
            .lock()
            .map(|r| r.keys().copied().collect())
            .unwrap_or_default()
    }

    async fn run(&self, task: Task, cancel: oneshot::Receiver<()>) {
        let execution = match self.inner.policy.timeout_for(task.timeout_ms) {
            // Refused before it began: no "started" for it.
            Err(why) => Execution::refused(&why),
            Ok(timeout) => {
                self.inner.metrics.task_started();
                let _ = self.inner.events.send(ExecEvent::Started(TaskStarted {
                    task_id: task.task_id,
                    attempt: task.attempt,
                    at_ms: now_ms(),
                }));
                let live = self.inner.output.attempt(task.task_id, task.attempt);
                let policy = &self.inner.policy;
                let mut execution =
                    execute_streaming(&task.spec, policy, timeout, cancel, Some(live.clone()))
                        .await;
                execution.output_chunks = live.chunks();
                execution
            }
        };
        if let Ok(mut running) = self.inner.running.lock() {
            running.remove(&task.task_id);
        }
        self.finish(&task, execution).await;
    }

    /// Counts, logs and stores the result of `task`, then hands it to the connection loop.
    async fn finish(&self, task: &Task, execution: Execution) {
        self.inner.metrics.task_finished(execution.outcome);
        if let Some(why) = execution
            .error
            .as_deref()
            .filter(|e| e.starts_with("refused: "))
        {
            tracing::warn!(task_id = task.task_id, reason = why, "Task refused.");
        }
        tracing::info!(
            task_id = task.task_id,
            outcome = ?execution.outcome,
            exit_code = ?execution.exit_code,
            "Task finished."
        );
        let result = execution.into_result(task);
        match store(&self.inner.outbox, result).await {
            Ok((seq, payload)) => {
                let _ = self.inner.events.send(ExecEvent::Finished {
                    task_id: task.task_id,
                    seq,
                    payload,
                });
            }
            // Nothing durable exists to send; sending it anyway would break the promise
            // that every delivered result can be replayed, so the loss is logged loudly.
            Err(e) => tracing::error!(task_id = task.task_id, error = %e, "Result lost."),
        }
    }
}

/// Writes `result` to the outbox with its own message id and returns the entry's sequence
/// and the encoded result.
pub async fn store(outbox: &Arc<Outbox>, result: TaskResult) -> Result<(u64, Vec<u8>), ExecError> {
    let outbox = Arc::clone(outbox);
    tokio::task::spawn_blocking(move || {
        let mut encoded = Vec::new();
        let seq = outbox.append_with(RESULT_KIND, |id| {
            let mut result = result;
            result.message_id = id.to_string();
            encoded = payload::to_bus(&result)?;
            Ok::<_, ExecError>(encoded.clone())
        })?;
        Ok((seq, encoded))
    })
    .await?
}

/// Runs one task spec to completion, timeout or cancel, if `policy` allows it.
pub async fn execute(
    spec: &TaskKind,
    policy: &ExecPolicy,
    timeout: Duration,
    cancel: oneshot::Receiver<()>,
) -> Execution {
    execute_streaming(spec, policy, timeout, cancel, None).await
}

/// [`execute`], streaming a command's output through `live` as it is produced.
pub async fn execute_streaming(
    spec: &TaskKind,
    policy: &ExecPolicy,
    timeout: Duration,
    cancel: oneshot::Receiver<()>,
    live: Option<AttemptOutput>,
) -> Execution {
    match spec {
        TaskKind::Command { argv, env, cwd } => {
            run_command(argv, env, cwd.as_deref(), policy, timeout, cancel, live).await
        }
        TaskKind::TcpProbe { target } => {
            let started = Instant::now();
            with_deadline(tcp_probe(target, policy), started, timeout, cancel).await
        }
        TaskKind::HttpProbe { url } => {
            let started = Instant::now();
            with_deadline(http_probe(url, policy), started, timeout, cancel).await
        }
    }
}

/// Resolves `host`, checks every address against the policy and connects to the first
/// one that answers. Connecting to the checked [`SocketAddr`] (never to the name again)
/// is what keeps a second DNS answer from sending the probe elsewhere.
async fn connect_checked(
    host: &str,
    port: u16,
    policy: &ExecPolicy,
) -> Result<TcpStream, Execution> {
    if !is_probe_host(host) {
        return Err(Execution::failed(
            Outcome::Failed,
            format!("bad host {host:?}"),
        ));
    }
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host, port)).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            return Err(Execution::failed(
                Outcome::Failed,
                format!("resolve {host}: {e}"),
            ));
        }
    };
    // One denied address refuses the whole name: a name that also leads to a metadata
    // service is not one to probe.
    for addr in &addrs {
        policy
            .check_probe_addr(addr.ip())
            .map_err(|why| Execution::refused(&why))?;
    }
    let mut last = format!("{host} resolved to no address");
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    Err(Execution::failed(Outcome::Failed, last))
}

/// Connects to `host:port` (`[v6]:port` for IPv6 literals).
async fn tcp_probe(target: &str, policy: &ExecPolicy) -> Execution {
    if let Err(why) = check_probe_text(target) {
        return Execution::refused(&why);
    }
    let (host, port) = match split_host_port(target, None) {
        Ok(parts) => parts,
        Err(e) => return Execution::failed(Outcome::Failed, format!("{e} in {target}")),
    };
    match connect_checked(host, port, policy).await {
        Ok(_) => Execution::new(Outcome::Succeeded),
        Err(e) => e,
    }
}

/// Splits `host[:port]` or `[v6][:port]` into the host (without brackets) and the port
/// (`default` when absent; required when `default` is `None`).
fn split_host_port(authority: &str, default: Option<u16>) -> Result<(&str, u16), &'static str> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unterminated [IPv6] host")?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or("junk after the [IPv6] host")?),
            ),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host");
    }
    let port = match (port, default) {
        (Some(p), _) => p.parse::<u16>().map_err(|_| "bad port")?,
        (None, Some(d)) => d,
        (None, None) => return Err("no port"),
    };
    Ok((host, port))
}

/// Runs a probe under the task's timeout and cancel, and stamps its latency.
async fn with_deadline(
    probe: impl Future<Output = Execution>,
    started: Instant,
    timeout: Duration,
    mut cancel: oneshot::Receiver<()>,
) -> Execution {
    let mut execution = tokio::select! {
        e = probe => e,
        () = tokio::time::sleep(timeout) => Execution::failed(Outcome::TimedOut, "timed out"),
        Ok(()) = &mut cancel => Execution::failed(Outcome::Cancelled, "cancelled"),
    };
    execution.latency_ms = Some(elapsed_ms(started));
    execution
}

/// GETs an `http://` URL over a plain TCP connection and reads the status line.
///
/// 2xx and 3xx count as succeeded, anything else as failed (with the status recorded):
/// a probe asks "does the service answer sanely", and a 500 is not sane.
async fn http_probe(url: &str, policy: &ExecPolicy) -> Execution {
    if let Err(why) = check_probe_text(url) {
        return Execution::refused(&why);
    }
    let (host, port, authority, path) = match parse_http_url(url) {
        Ok(parts) => parts,
        Err(e) => return Execution::failed(Outcome::Failed, e),
    };
    let mut stream = match connect_checked(&host, port, policy).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: rt-agent/{}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        return Execution::failed(Outcome::Failed, format!("write: {e}"));
    }
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    // Only the status line is needed; stop at its end instead of reading the body.
    while !head.windows(2).any(|w| w == b"\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) => return Execution::failed(Outcome::Failed, format!("read: {e}")),
        }
        if head.len() > HTTP_HEAD_MAX {
            break;
        }
    }
    match parse_status_line(&head) {
        Some(status) => {
            let mut e = Execution::new(if (200..400).contains(&status) {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            });
            if e.outcome == Outcome::Failed {
                e.error = Some(format!("HTTP {status}"));
            }
            e.http_status = Some(status);
            e
        }
        None => Execution::failed(Outcome::Failed, "no HTTP status line in the response"),
    }
}

/// Splits `http://authority/path` into (host to connect to, port, Host header, path).
/// The caller has already refused whitespace and control characters; the fragment is
/// dropped (it is never sent).
fn parse_http_url(url: &str) -> Result<(String, u16, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("only http:// URLs are supported: {url}"))?;
    let rest = rest.split('#').next().unwrap_or_default();
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    let path = if path.is_empty() {
        "/".to_owned()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("bad authority in {url}"));
    }
    let (host, port) = split_host_port(authority, Some(80)).map_err(|e| format!("{e} in {url}"))?;
    if !is_probe_host(host) {
        return Err(format!("bad host in {url}"));
    }
    Ok((host.to_owned(), port, authority.to_owned(), path))
}

/// The status code of an `HTTP/1.x NNN ...` line.
fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// How a command's wait ended.
enum End {
    Exited(std::io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Checks a command against the policy off the async threads (it reads the file system).
async fn prepare(
    policy: &ExecPolicy,
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Result<Prepared, Execution> {
    let (policy, argv, env, cwd) = (
        policy.clone(),
        argv.to_vec(),
        env.clone(),
        cwd.map(str::to_owned),
    );
    match tokio::task::spawn_blocking(move || policy.prepare(&argv, &env, cwd.as_deref())).await {
        Ok(Ok(prepared)) => Ok(prepared),
        Ok(Err(why)) => Err(Execution::refused(&why)),
        Err(e) => Err(Execution::failed(
            Outcome::Failed,
            format!("policy check did not complete: {e}"),
        )),
    }
}

async fn run_command(
    argv: &[String],
    env: &BTreeMap<String, String>,
    cwd: Option<&str>,
    policy: &ExecPolicy,
    timeout: Duration,
    mut cancel: oneshot::Receiver<()>,
    live: Option<AttemptOutput>,
) -> Execution {
    let prepared = match prepare(policy, argv, env, cwd).await {
        Ok(prepared) => prepared,
        Err(refused) => return refused,
    };
    let started = Instant::now();
    // The resolved absolute path is executed (no lookup by the spawn), with the task's
    // argv[0] as given, like a shell would pass it.
    let mut command = tokio::process::Command::new(&prepared.program);
    command
        .arg0(&prepared.arg0)
        .args(argv.iter().skip(1))
        .env_clear()
        .envs(prepared.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&prepared.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group (pgid = its pid), so the whole tree can be killed at once.
        .process_group(0)
        // If the agent itself goes away mid-task, at least the direct child dies with it.
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return Execution::failed(
                Outcome::Failed,
                format!("spawn {}: {e}", prepared.program.display()),
            );
        }
    };
    let pgid = child.id();
    let mut stdout = child
        .stdout
        .take()
        .map(|s| tokio::spawn(read_stream(s, Stream::Stdout, live.clone(), TAIL_BYTES)));
    let mut stderr = child
        .stderr
        .take()
        .map(|s| tokio::spawn(read_stream(s, Stream::Stderr, live, TAIL_BYTES)));

    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        () = tokio::time::sleep(timeout) => End::TimedOut,
        Ok(()) = &mut cancel => End::Cancelled,
    };
    let mut execution = match end {
        End::Exited(Ok(status)) => exited(status),
        End::Exited(Err(e)) => Execution::failed(Outcome::Failed, format!("wait: {e}")),
        End::TimedOut | End::Cancelled => {
            kill_group(pgid);
            // Reap the child; if the group kill failed, fall back to killing it directly.
            if tokio::time::timeout(KILL_WAIT, child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(KILL_WAIT, child.wait()).await;
            }
            if matches!(end, End::TimedOut) {
                Execution::failed(Outcome::TimedOut, format!("killed after {timeout:?}"))
            } else {
                Execution::failed(Outcome::Cancelled, "cancelled")
            }
        }
    };
    // Something the command left running in the background may still hold the pipes; give
    // it a moment, then kill the group so the result is not held up indefinitely.
    let drained = tokio::time::timeout(PIPE_DRAIN, join_tails(&mut stdout, &mut stderr)).await;
    let (out, err) = match drained {
        Ok(tails) => tails,
        Err(_) => {
            kill_group(pgid);
            tokio::time::timeout(KILL_WAIT, join_tails(&mut stdout, &mut stderr))
                .await
                .unwrap_or_default()
        }
    };
    execution.stdout_tail = String::from_utf8_lossy(&out).into_owned();
    execution.stderr_tail = String::from_utf8_lossy(&err).into_owned();
    execution.latency_ms = Some(elapsed_ms(started));
    execution
}

fn exited(status: ExitStatus) -> Execution {
    use std::os::unix::process::ExitStatusExt;
    let mut e = Execution::new(if status.success() {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    });
    e.exit_code = status.code();
    if let Some(signal) = status.signal() {
        e.error = Some(format!("killed by signal {signal}"));
    }
    e
}

/// Awaits both tail readers (each at most once; a finished handle is taken out).
async fn join_tails(
    stdout: &mut Option<tokio::task::JoinHandle<Vec<u8>>>,
    stderr: &mut Option<tokio::task::JoinHandle<Vec<u8>>>,
) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(handle) = stdout.as_mut() {
        out = handle.await.unwrap_or_default();
        *stdout = None;
    }
    if let Some(handle) = stderr.as_mut() {
        err = handle.await.unwrap_or_default();
        *stderr = None;
    }
    (out, err)
}

/// Sends SIGKILL to the process group `pgid` (`kill(-pgid, SIGKILL)`).
fn kill_group(pgid: Option<u32>) {
    use rustix::process::{Pid, Signal, kill_process_group};
    // Pid 0 or 1 would signal this agent's own group or every process: never a task's.
    let Some(pid) = pgid
        .and_then(|p| i32::try_from(p).ok())
        .filter(|&p| p > 1)
        .and_then(Pid::from_raw)
    else {
        return;
    };
    match kill_process_group(pid, Signal::KILL) {
        Ok(()) => {}
        // A group that is already gone is the normal case after an exit.
        Err(rustix::io::Errno::SRCH) => tracing::debug!(pgid = ?pgid, "No such process group."),
        Err(e) => tracing::warn!(pgid = ?pgid, error = %e, "Cannot kill the process group."),
    }
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(argv: &[&str]) -> TaskKind {
        TaskKind::Command {
            argv: argv.iter().map(|s| (*s).to_owned()).collect(),
            env: BTreeMap::new(),
            cwd: None,
        }
    }

    fn policy() -> ExecPolicy {
        ExecPolicy::with_commands(["echo", "sh", "false"])
    }

    async fn run(spec: TaskKind, timeout: Duration) -> Execution {
        let (_tx, rx) = oneshot::channel();
        execute(&spec, &policy(), timeout, rx).await
    }

    #[tokio::test]
    async fn commands_report_output_and_exit_codes() {
        let e = run(command(&["echo", "hello"]), Duration::from_secs(10)).await;
        assert_eq!(e.outcome, Outcome::Succeeded, "{e:?}");
        assert_eq!(e.exit_code, Some(0));
        assert_eq!(e.stdout_tail, "hello\n");

        let e = run(command(&["false"]), Duration::from_secs(10)).await;
        assert_eq!((e.outcome, e.exit_code), (Outcome::Failed, Some(1)));

        let e = run(
            command(&[
                "sh",
                "-c",
                "head -c 10000 /dev/zero | tr '\\0' x; echo oops >&2",
            ]),
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(e.stdout_tail.len(), TAIL_BYTES);
        assert_eq!(e.stderr_tail, "oops\n");
    }

    #[tokio::test]
    async fn refuses_programs_off_the_allowlist() {
        for argv in [&["rm", "-rf", "/nonexistent"][..], &["/bin/echo", "x"], &[]] {
            let e = run(command(argv), Duration::from_secs(10)).await;
            assert_eq!(e.outcome, Outcome::Failed);
            assert!(e.error.is_some(), "{argv:?}");
        }
        let e = run(command(&["rm"]), Duration::from_secs(10)).await;
        assert_eq!(
            e.error.as_deref(),
            Some("refused: program \"rm\" is not on allowed_commands")
        );
    }

    #[tokio::test]
    async fn timeout_and_cancel_kill_the_whole_group() {
        // The grandchild `sleep` holds stdout open: unless the whole group dies, the tail
        // reader would wait for it.
        let e = run(
            command(&["sh", "-c", "sleep 30 & sleep 30"]),
            Duration::from_millis(200),
        )
        .await;
        assert_eq!(e.outcome, Outcome::TimedOut, "{e:?}");

        let (tx, rx) = oneshot::channel();
        let spec = command(&["sh", "-c", "sleep 30"]);
        let policy = policy();
        let handle =
            tokio::spawn(async move { execute(&spec, &policy, Duration::from_secs(30), rx).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(()).unwrap();
        let e = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e.outcome, Outcome::Cancelled);
    }

    #[tokio::test]
    async fn probes_report_reachability_and_status() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        });
        let e = run(
            TaskKind::TcpProbe {
                target: addr.to_string(),
            },
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(e.outcome, Outcome::Succeeded, "{e:?}");
        assert!(e.latency_ms.is_some());

        let e = run(
            TaskKind::HttpProbe {
                url: format!("http://{addr}/health"),
            },
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(
            (e.outcome, e.http_status),
            (Outcome::Succeeded, Some(204)),
            "{e:?}"
        );

        // A port nobody listens on: bind, learn the port, close.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = run(
            TaskKind::TcpProbe {
                target: closed.to_string(),
            },
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(e.outcome, Outcome::Failed);
        let e = run(
            TaskKind::HttpProbe {
                url: "https://example.com/".into(),
            },
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(e.outcome, Outcome::Failed);
    }

    #[test]
    fn parses_http_urls() {
        assert_eq!(
            parse_http_url("http://a.b:8080/x?y=1").unwrap(),
            ("a.b".into(), 8080, "a.b:8080".into(), "/x?y=1".into())
        );
        assert_eq!(
            parse_http_url("http://[::1]/").unwrap(),
            ("::1".into(), 80, "[::1]".into(), "/".into())
        );
        assert_eq!(parse_http_url("http://h").unwrap().3, "/");
        assert!(parse_http_url("http://h:x/").is_err());
        assert!(parse_http_url("http:///").is_err());
        assert!(parse_http_url("http://a:b@h/").is_err());
        assert!(parse_http_url("http://h%0d/").is_err());
        assert_eq!(parse_http_url("http://h/p#frag").unwrap().3, "/p");
        assert_eq!(split_host_port("h:1", None), Ok(("h", 1)));
        assert_eq!(split_host_port("[::1]:2", None), Ok(("::1", 2)));
        assert!(split_host_port("h", None).is_err());
        assert!(split_host_port("[::1", Some(80)).is_err());
        assert_eq!(parse_status_line(b"HTTP/1.1 503 Busy\r\n"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0\r\n"), None);
    }
}
