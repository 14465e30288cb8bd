//! A worker process: holds one slice of the run's connections. The parent
//! ([`crate::coordinator`]) starts it as `loadtest worker --spec <json>`; it opens its
//! connections at its share of the target rate, keeps them (heartbeats, pushes, acks, or
//! the agent side of the fleet contract), cycles a fraction of them every second under
//! churn, and prints one JSON line per second ([`WorkerLine`]) with the counters and
//! latency histograms of that second. It stops when its stdin says `stop` or closes, or
//! at its hard deadline, whichever comes first, and then prints a final line.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use messages::fleet::{
    self, Ack, ConfigAck, ConfigOutcome, ConfigPush, Outcome, Register, Task, TaskResult,
    TaskStarted,
};
use messages::payload::{self, HeartbeatAck, Welcome};
use messages::{BodyCodec, Frame, FrameKind, Route};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{Notify, Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, BoxError, Ws};
use crate::hist::Hist;
use crate::outbox::Outbox;
use crate::redial;

/// What each connection of a worker is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    /// An app client: heartbeats, records pushes, acks those that ask for a receipt.
    Client,
    /// A simulated edge agent: registers, heartbeats, runs tasks instantly and sends
    /// results, exactly on the fleet contract of `messages::fleet`.
    Agent,
    /// The peer: a subscriber on nats-server's own WebSocket listener ([`crate::natsws`]).
    NatsWs,
}

/// An established connection of either kind.
enum Established {
    Gateway(Ws, Welcome),
    Nats(Ws, crate::natsws::Parser),
}

/// Everything a worker needs, passed by the parent as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct WorkerSpec {
    /// Worker number.
    pub index: usize,
    /// Gateway URLs; connection `g` (global index) goes to `urls[g % len]`.
    pub urls: Vec<String>,
    /// HS256 secret for tokens.
    pub secret: String,
    /// Agent-token key (PEM) for simulated agents' tokens; empty when not given.
    #[serde(default)]
    pub agent_key: String,
    /// Global index of this worker's first connection.
    pub first: usize,
    /// Connections this worker holds.
    pub count: usize,
    /// This worker's connects per second while opening (0 = unpaced).
    pub rate: f64,
    /// Handshakes in flight at once.
    pub concurrency: usize,
    /// First source address's last octet (127.0.0.x).
    pub source_first: u8,
    /// Source addresses to spread over.
    pub sources: u8,
    /// User id prefix (`<prefix>-<global index>`).
    pub user_prefix: String,
    /// Role of every connection.
    pub role: Role,
    /// Fraction of this worker's connections closed and reopened every second once all
    /// are open (0 = no churn).
    pub churn_per_sec: f64,
    /// Hard bound on the worker's life, seconds.
    pub max_secs: u64,
    /// Diagnostic: agents send no `agent.task.started` before the result (the real agent
    /// always does); isolates what the started messages cost the scheduler.
    #[serde(default)]
    pub skip_started: bool,
    /// Agents whose global index modulo 100 is below this fail their tasks (exit code 1)...
    #[serde(default)]
    pub fail_percent: u8,
    /// ...from this task id on (0: every task). A staged-rollout run uses it to make
    /// agents fail only after the pilot's batches (task ids are allocated in order).
    #[serde(default)]
    pub fail_from_task: u64,
    /// Agents send a result or config ack again when it is still unacknowledged this long
    /// after it was sent, as services/agent does (`resend_after_ms`; 0: never).
    #[serde(default)]
    pub resend_after_ms: u64,
    /// A lost connection is opened again, to another URL drawn at random, after the
    /// backoff of docs/protocol.md 13.1 (base 100 ms, doubling, cap 30 s, 0.3 jitter), as
    /// services/agent does ([`crate::redial`]); the time from loss to the new welcome is
    /// recorded.
    #[serde(default)]
    pub reconnect: bool,
}

/// One line a worker prints: counters are deltas since the previous line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct WorkerLine {
    /// Worker number.
    pub w: usize,
    /// Connections open now.
    pub open: u64,
    /// Whether the first attempt of every connection has finished.
    pub opened: bool,
    /// Successful handshakes (welcome received).
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Connections the server closed or that broke.
    pub closed: u64,
    /// Churn closes (client-initiated).
    pub churned: u64,
    /// Pushes received.
    pub recv: u64,
    /// Receipts (ack frames) sent.
    pub acks: u64,
    /// Agents: register messages sent.
    pub registered: u64,
    /// Agents: tasks received.
    pub tasks: u64,
    /// Agents: results sent.
    pub results: u64,
    /// Agents: result ids acknowledged by the scheduler.
    pub result_acks: u64,
    /// Agents: results and config acks sent again: unacknowledged after `resend_after_ms`,
    /// or replayed from the outbox after a new register.
    pub resent: u64,
    /// Connections opened again after a loss (`reconnect`).
    pub reconnects: u64,
    /// Loss -> welcome again, µs (`reconnect`).
    pub rc: Hist,
    /// Handshake latency (TCP connect to welcome), µs.
    pub hs: Hist,
    /// Push latency (sender's stamp -> received), µs.
    pub lat: Hist,
    /// Unix µs when this worker started its first connection attempt (0 = not yet).
    pub started_at_us: u64,
    /// Unix µs when the first attempt of its last connection finished (0 = not yet).
    pub opened_at_us: u64,
    /// Set on the last line.
    pub last: bool,
    /// Last line only: deliveries per push sequence number.
    pub per_push: BTreeMap<u64, u64>,
    /// Last line only: pushes missing inside a session (between the first and the last one
    /// a connection received).
    pub gaps: u64,
    /// Last line only: pushes stamped while a connection was open that it never received
    /// ([`crate::presence`]).
    pub missed: u64,
}

#[derive(Debug, Default)]
struct Counters {
    open: AtomicU64,
    connects: AtomicU64,
    connect_errors: AtomicU64,
    closed: AtomicU64,
    churned: AtomicU64,
    recv: AtomicU64,
    acks: AtomicU64,
    registered: AtomicU64,
    tasks: AtomicU64,
    results: AtomicU64,
    result_acks: AtomicU64,
    resent: AtomicU64,
    reconnects: AtomicU64,
    rc: Mutex<Hist>,
    first_done: AtomicU64,
    started_at_us: AtomicU64,
    opened_at_us: AtomicU64,
    gaps: AtomicU64,
    missed: AtomicU64,
    push_times: crate::presence::PushTimes,
    hs: Mutex<Hist>,
    lat: Mutex<Hist>,
    per_push: Mutex<HashMap<u64, u64>>,
}

fn take(a: &AtomicU64) -> u64 {
    a.swap(0, Ordering::Relaxed)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Counters {
    fn line(&self, w: usize, opened: bool) -> WorkerLine {
        WorkerLine {
            w,
            open: self.open.load(Ordering::Relaxed),
            opened,
            connects: take(&self.connects),
            connect_errors: take(&self.connect_errors),
            closed: take(&self.closed),
            churned: take(&self.churned),
            recv: take(&self.recv),
            acks: take(&self.acks),
            registered: take(&self.registered),
            tasks: take(&self.tasks),
            results: take(&self.results),
            result_acks: take(&self.result_acks),
            resent: take(&self.resent),
            reconnects: take(&self.reconnects),
            rc: lock(&self.rc).take(),
            hs: lock(&self.hs).take(),
            lat: lock(&self.lat).take(),
            started_at_us: self.started_at_us.load(Ordering::Relaxed),
            opened_at_us: self.opened_at_us.load(Ordering::Relaxed),
            ..WorkerLine::default()
        }
    }
}

fn emit(line: &WorkerLine) {
    if let Ok(s) = serde_json::to_string(line) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
        let _ = out.flush();
    }
}

/// Runs a worker to its end.
pub(crate) async fn run(spec: WorkerSpec) -> Result<(), BoxError> {
    if spec.urls.is_empty() {
        return Err("worker without urls".into());
    }
    let spec = Arc::new(spec);
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop) = watch::channel(false);
    let started = Instant::now();

    // Stop on "stop" or EOF on stdin.
    let stdin_stop = stop_tx.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(l)) if l.trim() != "stop" => continue,
                _ => break,
            }
        }
        let _ = stdin_stop.send(true);
    });

    let kicks: Arc<Vec<Notify>> = Arc::new((0..spec.count).map(|_| Notify::new()).collect());
    let permits = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let opened = Arc::new(AtomicBool::new(false));

    // Spawner: paced first attempts.
    let spawner = {
        let (spec, counters, stop, kicks, permits) = (
            Arc::clone(&spec),
            Arc::clone(&counters),
            stop.clone(),
            Arc::clone(&kicks),
            Arc::clone(&permits),
        );
        tokio::spawn(async move {
            let mut tasks = Vec::with_capacity(spec.count);
            let t0 = tokio::time::Instant::now();
            counters
                .started_at_us
                .store(messages::headers::now_micros(), Ordering::Relaxed);
            for slot in 0..spec.count {
                if *stop.borrow() {
                    break;
                }
                if spec.rate > 0.0 {
                    let at = t0 + Duration::from_secs_f64(slot as f64 / spec.rate);
                    tokio::time::sleep_until(at).await;
                }
                tasks.push(tokio::spawn(connection(
                    Arc::clone(&spec),
                    slot,
                    Arc::clone(&counters),
                    stop.clone(),
                    Arc::clone(&kicks),
                    Arc::clone(&permits),
                )));
            }
            tasks
        })
    };

    // Churn: once everything is open, kick a round-robin share of the slots every second.
    if spec.churn_per_sec > 0.0 {
        let (spec, kicks, opened, mut stop) = (
            Arc::clone(&spec),
            Arc::clone(&kicks),
            Arc::clone(&opened),
            stop.clone(),
        );
        tokio::spawn(async move {
            let per_sec = (spec.churn_per_sec * spec.count as f64).round() as usize;
            let mut cursor = 0usize;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => break,
                }
                if !opened.load(Ordering::Relaxed) || spec.count == 0 {
                    continue;
                }
                for _ in 0..per_sec {
                    if let Some(k) = kicks.get(cursor % spec.count) {
                        k.notify_one();
                    }
                    cursor += 1;
                }
            }
        });
    }

    // Reporter: one line per second until stop or deadline.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.max_secs.max(1));
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut stop_wait = stop.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop_wait.changed() => break,
            () = tokio::time::sleep_until(deadline) => {
                eprintln!("worker {}: hard deadline of {}s reached, stopping", spec.index, spec.max_secs);
                break;
            }
        }
        let done = counters.first_done.load(Ordering::Relaxed) >= spec.count as u64;
        opened.store(done, Ordering::Relaxed);
        emit(&counters.line(spec.index, done));
    }
    let _ = stop_tx.send(true);
    // Let every connection close (bounded), then the final line.
    if let Ok(Ok(tasks)) = tokio::time::timeout(Duration::from_secs(5), spawner).await {
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            for t in tasks {
                let _ = t.await;
            }
        })
        .await;
    }
    let done = counters.first_done.load(Ordering::Relaxed) >= spec.count as u64;
    let mut line = counters.line(spec.index, done);
    line.last = true;
    line.per_push = lock(&counters.per_push)
        .iter()
        .map(|(k, v)| (*k, *v))
        .collect();
    line.gaps = counters.gaps.load(Ordering::Relaxed);
    line.missed = counters.missed.load(Ordering::Relaxed);
    emit(&line);
    let _ = started;
    Ok(())
}

/// How a session ended.
enum End {
    Stop,
    Churn,
    Lost,
}

/// One connection slot: first attempt, then reconnects under churn.
async fn connection(
    spec: Arc<WorkerSpec>,
    slot: usize,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    kicks: Arc<Vec<Notify>>,
    permits: Arc<Semaphore>,
) {
    let global = spec.first + slot;
    let mut url_index = global % spec.urls.len();
    // Since when this slot has been without a connection after a loss, and the failed
    // attempts since (the backoff exponent).
    let mut lost_at: Option<Instant> = None;
    let mut failures = 0u32;
    let (user, kind) = match spec.role {
        Role::Client => (format!("{}-{global}", spec.user_prefix), "app"),
        Role::Agent => (format!("{}-{global}", spec.user_prefix), "agent"),
        Role::NatsWs => (String::new(), ""),
    };
    let token = if kind == "agent" {
        client::sign_agent(&spec.agent_key, &user)
    } else {
        client::sign(&spec.secret, &user, kind)
    };
    let source = client::source_for(slot, spec.source_first, spec.sources);
    // Identifies this agent's "outbox" in result message ids.
    let instance: u128 = (u128::from(std::process::id()) << 64) | global as u128;
    let mut next_result_seq = 1u64;
    // Outlives the sessions, as services/agent's outbox on disk does.
    let mut outbox = Outbox::default();
    let mut first = true;
    let churning = spec.churn_per_sec > 0.0;
    loop {
        if *stop.borrow() {
            break;
        }
        let url = &spec.urls[url_index % spec.urls.len()];
        let attempt = {
            let Ok(_permit) = permits.acquire().await else {
                break;
            };
            let t = Instant::now();
            let r = match spec.role {
                Role::NatsWs => crate::natsws::connect(url, source)
                    .await
                    .map(|(ws, p)| Established::Nats(ws, p)),
                _ => client::connect(url, &token, source)
                    .await
                    .map(|(ws, w)| Established::Gateway(ws, w)),
            };
            (r, t.elapsed())
        };
        if first {
            if counters.first_done.fetch_add(1, Ordering::Relaxed) + 1 == spec.count as u64 {
                counters
                    .opened_at_us
                    .store(messages::headers::now_micros(), Ordering::Relaxed);
            }
            first = false;
        }
        let established = match attempt {
            (Ok(ok), took) => {
                counters.connects.fetch_add(1, Ordering::Relaxed);
                lock(&counters.hs).record(took.as_micros() as u64);
                if let Some(t) = lost_at.take() {
                    counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    lock(&counters.rc).record(t.elapsed().as_micros() as u64);
                }
                failures = 0;
                ok
            }
            (Err(e), _) => {
                if counters.connect_errors.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("worker {}: connect to {url} failed: {e}", spec.index);
                }
                if spec.reconnect && lost_at.is_some() {
                    let (next, delay) =
                        redial_after(spec.urls.len(), url_index, failures, instance);
                    url_index = next;
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        _ = stop.changed() => break,
                    }
                }
                if !churning {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = stop.changed() => break,
                }
            }
        };
        counters.open.fetch_add(1, Ordering::Relaxed);
        let kick = kicks.get(slot);
        let end = match established {
            Established::Gateway(ws, welcome) => {
                session(
                    &spec,
                    &user,
                    instance,
                    &mut next_result_seq,
                    &mut outbox,
                    ws,
                    &welcome,
                    &counters,
                    &mut stop,
                    kick,
                )
                .await
            }
            Established::Nats(ws, parser) => {
                nats_session(ws, parser, &counters, &mut stop, kick).await
            }
        };
        counters.open.fetch_sub(1, Ordering::Relaxed);
        match end {
            End::Stop => break,
            End::Churn => counters.churned.fetch_add(1, Ordering::Relaxed),
            End::Lost => {
                counters.closed.fetch_add(1, Ordering::Relaxed);
                if spec.reconnect {
                    lost_at = Some(Instant::now());
                    let (next, delay) =
                        redial_after(spec.urls.len(), url_index, failures, instance);
                    url_index = next;
                    failures = failures.saturating_add(1);
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        _ = stop.changed() => break,
                    }
                }
                if !churning {
                    break;
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => break,
                }
                0
            }
        };
    }
}

/// After a failure on gateway `url_index`: the gateway to try next (another one, drawn
/// at random) and how long to wait first ([`crate::redial`], services/agent's rule).
fn redial_after(
    count: usize,
    url_index: usize,
    failures: u32,
    instance: u128,
) -> (usize, Duration) {
    let next = redial::other_gateway(
        count,
        url_index % count.max(1),
        redial::draw(instance, failures),
    );
    let delay = redial::backoff(failures, redial::draw(!instance, failures));
    (next, delay)
}

/// Pushes seen in one session, for gap counting.
struct Seen {
    first: Option<u64>,
    last: u64,
    count: u64,
    /// Sequence numbers received (a session lasts a few pushes under churn; the soak's
    /// longest sessions hold a few hundred).
    got: Vec<u64>,
    /// Unix µs at the welcome.
    welcome_us: u64,
}

impl Default for Seen {
    fn default() -> Self {
        Seen {
            first: None,
            last: 0,
            count: 0,
            got: Vec::new(),
            welcome_us: messages::headers::now_micros(),
        }
    }
}

impl Seen {
    fn add(&mut self, seq: u64) {
        if self.first.is_none() {
            self.first = Some(seq);
        }
        self.last = self.last.max(seq);
        self.count += 1;
        self.got.push(seq);
    }

    /// Pushes stamped while this session was open that it did not receive.
    fn missed(&mut self, times: &crate::presence::PushTimes) -> u64 {
        self.got.sort_unstable();
        times.missed(self.welcome_us, messages::headers::now_micros(), &self.got)
    }

    fn gaps(&self) -> u64 {
        match self.first {
            Some(f) => (self.last - f + 1).saturating_sub(self.count),
            None => 0,
        }
    }
}

/// Serves one established connection until stop, churn or loss.
#[allow(clippy::too_many_arguments)]
async fn session(
    spec: &WorkerSpec,
    user: &str,
    instance: u128,
    next_result_seq: &mut u64,
    outbox: &mut Outbox,
    mut ws: Ws,
    welcome: &Welcome,
    counters: &Counters,
    stop: &mut watch::Receiver<bool>,
    kick: Option<&Notify>,
) -> End {
    let mut next_id = 1u64;
    // The low 64 bits of `instance` are the connection's global index.
    let global = u64::try_from(instance & u128::from(u64::MAX)).unwrap_or(0);
    let behaviour = AgentBehaviour {
        skip_started: spec.skip_started,
        fail_from_task: (global % 100 < u64::from(spec.fail_percent))
            .then_some(spec.fail_from_task),
    };
    if spec.role == Role::Agent {
        let reg = Register {
            node_id: user.to_owned(),
            hostname: format!("sim-{user}"),
            version: "loadtest".to_owned(),
            labels: BTreeMap::from([
                ("fleet".to_owned(), "loadtest".to_owned()),
                ("worker".to_owned(), spec.index.to_string()),
            ]),
            addresses: vec!["127.0.0.1".to_owned()],
            configs: Default::default(),
        };
        if publish(&mut ws, &mut next_id, fleet::up::REGISTER, &reg)
            .await
            .is_err()
        {
            return End::Lost;
        }
        counters.registered.fetch_add(1, Ordering::Relaxed);
        // services/agent sends every outbox entry again after each register: what the
        // last connection took with it reaches the scheduler through this one.
        let pending = outbox.replay(tokio::time::Instant::now());
        if send_again(&mut ws, &mut next_id, pending, counters)
            .await
            .is_err()
        {
            return End::Lost;
        }
    }
    let mut seen = Seen::default();
    // Agents beat at 90% of the interval like services/agent; app clients at the interval.
    let factor = if spec.role == Role::Agent { 0.9 } else { 1.0 };
    let mut interval =
        Duration::from_millis(u64::from(welcome.heartbeat.base_ms.max(100))).mul_f64(factor);
    let mut next_beat = tokio::time::Instant::now() + interval;
    let resend_after = Duration::from_millis(spec.resend_after_ms);
    let mut next_resend = (spec.resend_after_ms > 0 && spec.role == Role::Agent)
        .then(|| tokio::time::Instant::now() + resend_after);
    let never = Notify::new();
    let kick = kick.unwrap_or(&never);
    let end = loop {
        tokio::select! {
            _ = stop.changed() => break End::Stop,
            () = kick.notified() => break End::Churn,
            () = async {
                match next_resend {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = tokio::time::Instant::now();
                let due = outbox.due(now, resend_after);
                if send_again(&mut ws, &mut next_id, due, counters).await.is_err() {
                    break End::Lost;
                }
                next_resend = Some(now + resend_after / 2);
            }
            () = tokio::time::sleep_until(next_beat) => {
                if ws.send(Message::Binary(Frame::new(FrameKind::Heartbeat).encode())).await.is_err() {
                    break End::Lost;
                }
                next_beat = tokio::time::Instant::now() + interval;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    let Ok(frame) = Frame::decode(&bytes, &client::limits()) else { continue };
                    match frame.kind {
                        FrameKind::Push => {
                            match spec.role {
                                Role::Client => {
                                    counters.recv.fetch_add(1, Ordering::Relaxed);
                                    if let Some((sent, seq)) = client::read_stamp(&frame.body) {
                                        let now = messages::headers::now_micros();
                                        lock(&counters.lat).record(now.saturating_sub(sent));
                                        *lock(&counters.per_push).entry(seq).or_insert(0) += 1;
                                        counters.push_times.note(seq, sent);
                                        seen.add(seq);
                                    }
                                    if frame.flags.receipt() && frame.msg_id != 0 {
                                        let ack = Frame::new(FrameKind::Ack).with_msg_id(frame.msg_id).encode();
                                        if ws.send(Message::Binary(ack)).await.is_err() {
                                            break End::Lost;
                                        }
                                        counters.acks.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Role::NatsWs => {}
                                Role::Agent => {
                                    if agent_push(&mut ws, &mut next_id, instance, next_result_seq, &frame, counters, behaviour, outbox).await.is_err() {
                                        break End::Lost;
                                    }
                                }
                            }
                        }
                        FrameKind::HeartbeatAck => {
                            if let Ok(ack) = payload::decode_body::<HeartbeatAck>(frame.flags.codec(), &frame.body) {
                                interval = Duration::from_millis(u64::from(ack.next_interval_ms.max(100))).mul_f64(factor);
                            }
                        }
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break End::Lost,
                Some(Ok(_)) => {}
            }
        }
    };
    counters.gaps.fetch_add(seen.gaps(), Ordering::Relaxed);
    counters
        .missed
        .fetch_add(seen.missed(&counters.push_times), Ordering::Relaxed);
    if !matches!(end, End::Lost) {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    end
}

/// Serves one peer subscription on nats-server's WebSocket listener.
async fn nats_session(
    mut ws: Ws,
    mut parser: crate::natsws::Parser,
    counters: &Counters,
    stop: &mut watch::Receiver<bool>,
    kick: Option<&Notify>,
) -> End {
    use crate::natsws::Event;
    let mut seen = Seen::default();
    let never = Notify::new();
    let kick = kick.unwrap_or(&never);
    let end = loop {
        tokio::select! {
            _ = stop.changed() => break End::Stop,
            () = kick.notified() => break End::Churn,
            msg = ws.next() => {
                let bytes = match msg {
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break End::Lost,
                    Some(Ok(_)) => continue,
                };
                let mut lost = false;
                for e in parser.feed(&bytes) {
                    match e {
                        Event::Msg(body) => {
                            counters.recv.fetch_add(1, Ordering::Relaxed);
                            if let Some((sent, seq)) = client::read_stamp(&body) {
                                let now = messages::headers::now_micros();
                                lock(&counters.lat).record(now.saturating_sub(sent));
                                *lock(&counters.per_push).entry(seq).or_insert(0) += 1;
                                counters.push_times.note(seq, sent);
                                seen.add(seq);
                            }
                        }
                        Event::Ping => {
                            if ws.send(Message::Binary(b"PONG\r\n".to_vec().into())).await.is_err() {
                                lost = true;
                            }
                        }
                        Event::Pong | Event::Err(_) => {}
                    }
                }
                if lost {
                    break End::Lost;
                }
            }
        }
    };
    counters.gaps.fetch_add(seen.gaps(), Ordering::Relaxed);
    counters
        .missed
        .fetch_add(seen.missed(&counters.push_times), Ordering::Relaxed);
    if !matches!(end, End::Lost) {
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    }
    end
}

/// Publishes a message (a result, a config ack) through the outbox: stored first, so it
/// is sent again until an `agent.ack` names it, even when this send fails.
async fn publish_tracked<T: Serialize>(
    ws: &mut Ws,
    next_id: &mut u64,
    route: &str,
    body: &T,
    message_id: String,
    outbox: &mut Outbox,
) -> Result<(), BoxError> {
    let route = Route::new(route)?;
    let bytes = payload::to_bus(body)?;
    outbox.add(
        message_id,
        route.clone(),
        bytes.clone(),
        tokio::time::Instant::now(),
    );
    let frame = Frame::new(FrameKind::Publish)
        .with_msg_id(*next_id)
        .with_route(route)
        .with_body(BodyCodec::MsgPack, bytes);
    *next_id += 1;
    ws.send(Message::Binary(frame.encode())).await?;
    Ok(())
}

/// Sends outbox entries again (a replay after register, or those due), counting them.
async fn send_again(
    ws: &mut Ws,
    next_id: &mut u64,
    entries: Vec<(Route, Vec<u8>)>,
    counters: &Counters,
) -> Result<(), BoxError> {
    for (route, body) in entries {
        let frame = Frame::new(FrameKind::Publish)
            .with_msg_id(*next_id)
            .with_route(route)
            .with_body(BodyCodec::MsgPack, body);
        *next_id += 1;
        ws.send(Message::Binary(frame.encode())).await?;
        counters.resent.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Sends a MessagePack publish frame on `route`, as services/agent does.
async fn publish<T: Serialize>(
    ws: &mut Ws,
    next_id: &mut u64,
    route: &str,
    body: &T,
) -> Result<(), BoxError> {
    let frame = Frame::new(FrameKind::Publish)
        .with_msg_id(*next_id)
        .with_route(Route::new(route)?)
        .with_body(BodyCodec::MsgPack, payload::to_bus(body)?);
    *next_id += 1;
    ws.send(Message::Binary(frame.encode())).await?;
    Ok(())
}

/// How a simulated agent answers tasks.
#[derive(Debug, Clone, Copy)]
struct AgentBehaviour {
    /// Send no `agent.task.started`.
    skip_started: bool,
    /// Fail tasks with this id or a later one (exit code 1).
    fail_from_task: Option<u64>,
}

/// The agent side of a push: a task is "run" at once (started, then a result: succeeded
/// with exit code 0, or failed with 1 when the behaviour says so); a config document is
/// acked as applied; an ack counts the acknowledged result ids.
#[allow(clippy::too_many_arguments)]
async fn agent_push(
    ws: &mut Ws,
    next_id: &mut u64,
    instance: u128,
    next_result_seq: &mut u64,
    frame: &Frame,
    counters: &Counters,
    behaviour: AgentBehaviour,
    outbox: &mut Outbox,
) -> Result<(), BoxError> {
    let codec = frame.flags.codec();
    // Scheduler pushes are signed envelopes; a simulated agent reads the message inside
    // without verifying (the load is on the control plane, not on agent-side checks).
    let Some(envelope) = messages::command::peek(&frame.body) else {
        return Ok(());
    };
    let body = &envelope.body[..];
    match frame.route.as_str() {
        fleet::down::TASK => {
            let Ok(task) = payload::decode_body::<Task>(codec, body) else {
                return Ok(());
            };
            counters.tasks.fetch_add(1, Ordering::Relaxed);
            let fails = behaviour
                .fail_from_task
                .is_some_and(|from| task.task_id >= from);
            let now_ms = messages::headers::now_micros() / 1000;
            let started = TaskStarted {
                task_id: task.task_id,
                attempt: task.attempt,
                at_ms: now_ms,
            };
            if !behaviour.skip_started {
                publish(ws, next_id, fleet::up::STARTED, &started).await?;
            }
            let result = TaskResult {
                message_id: format!("{instance:032x}-{}", *next_result_seq),
                task_id: task.task_id,
                attempt: task.attempt,
                outcome: if fails {
                    Outcome::Failed
                } else {
                    Outcome::Succeeded
                },
                exit_code: Some(i32::from(fails)),
                stdout_tail: String::new(),
                stderr_tail: String::new(),
                error: None,
                latency_ms: Some(0),
                http_status: None,
                finished_at_ms: now_ms,
                output_chunks: 0,
            };
            *next_result_seq += 1;
            let id = result.message_id.clone();
            // Counted once it is in the outbox: a failed send still reaches the scheduler.
            counters.results.fetch_add(1, Ordering::Relaxed);
            publish_tracked(ws, next_id, fleet::up::RESULT, &result, id, outbox).await?;
        }
        // A config document is "applied" at once: the ack echoes name, version and hash.
        fleet::down::CONFIG => {
            let Ok(push) = payload::decode_body::<ConfigPush>(codec, body) else {
                return Ok(());
            };
            let ack = ConfigAck {
                message_id: format!("{instance:032x}-{}", *next_result_seq),
                name: push.name,
                version: push.version,
                sha256: push.sha256,
                status: ConfigOutcome::Applied,
                error: None,
                at_ms: messages::headers::now_micros() / 1000,
            };
            *next_result_seq += 1;
            let id = ack.message_id.clone();
            publish_tracked(ws, next_id, fleet::up::CONFIG_ACK, &ack, id, outbox).await?;
        }
        fleet::down::ACK => {
            if let Ok(ack) = payload::decode_body::<Ack>(codec, body) {
                for id in &ack.message_ids {
                    outbox.ack(id);
                }
                counters
                    .result_acks
                    .fetch_add(ack.message_ids.len() as u64, Ordering::Relaxed);
            }
        }
        _ => {}
    }
    Ok(())
}
