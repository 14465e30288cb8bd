//! `rt-smoke`: an end-to-end check of a running system (compose or `scripts/up`), from the
//! outside, through the public interfaces only.
//!
//! 1. the expected number of agents are registered and online (scheduler HTTP API);
//! 2. a command task on all of them: every target succeeds, one result each;
//! 3. N WebSocket clients connect, spread over the gateways;
//! 4. a push through ws-api reaches every one of them;
//! 5. with `--stop-cmd`: the command runs (it should stop one gateway); the clients of
//!    stopped gateways reconnect to the others, a second push reaches every client and a
//!    second task gets a result from every agent (none lost);
//! 6. the demo (`/demo/` on ws-api): the page and the client library are served, and a
//!    development token from `/demo/token` is accepted by a gateway.
//!
//! Prints one `PASS`/`FAIL` line per step and exits 0 only if all passed; every wait is
//! bounded by `--timeout-secs` (whole run).
//!
//! ```text
//! rt-smoke --gateways ws://127.0.0.1:8081/ws,ws://127.0.0.1:8082/ws \
//!   --api http://127.0.0.1:8090 --scheduler http://127.0.0.1:8100 --api-key KEY \
//!   --secret HS256_SECRET --agents 3 [--clients 12] [--stop-cmd "docker stop abc"] \
//!   [--timeout-secs 240]
//! ```
//! `--api-key`, `--scheduler-key` and `--secret` may also come from `RT_SMOKE_API_KEY`,
//! `RT_SMOKE_SCHEDULER_KEY` and `RT_SMOKE_SECRET`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use messages::{Frame, FrameKind};
use serde_json::{Value, json};
use testkit::http;
use testkit::ws::{Received, TestClient};
use tokio::sync::mpsc;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: rt-smoke --gateways URL[,URL...] --api URL --scheduler URL \
--api-key KEY [--scheduler-key KEY] --secret HS256_SECRET --agents N [--clients N] \
[--stop-cmd CMD] [--timeout-secs N]";

#[derive(Debug)]
struct Options {
    gateways: Vec<String>,
    api: String,
    scheduler: String,
    api_key: String,
    scheduler_key: String,
    secret: String,
    agents: usize,
    clients: usize,
    stop_cmd: Option<String>,
    timeout: Duration,
}

fn parse_args() -> Result<Options, BoxError> {
    let mut args = std::env::args().skip(1);
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    while let Some(flag) = args.next() {
        if flag == "--help" || flag == "-h" {
            return Err(USAGE.into());
        }
        let name = flag
            .strip_prefix("--")
            .ok_or_else(|| format!("unexpected argument {flag:?}\n{USAGE}"))?;
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        map.insert(name.to_owned(), value);
    }
    let mut take = |name: &str, env: Option<&str>| -> Option<String> {
        map.remove(name)
            .or_else(|| env.and_then(|e| std::env::var(e).ok()))
    };
    let need = |v: Option<String>, name: &str| -> Result<String, BoxError> {
        v.filter(|s| !s.is_empty())
            .ok_or_else(|| format!("--{name} is required\n{USAGE}").into())
    };
    let gateways: Vec<String> = need(take("gateways", None), "gateways")?
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let api = need(take("api", None), "api")?;
    let scheduler = need(take("scheduler", None), "scheduler")?;
    let api_key = need(take("api-key", Some("RT_SMOKE_API_KEY")), "api-key")?;
    let scheduler_key = take("scheduler-key", Some("RT_SMOKE_SCHEDULER_KEY"))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| api_key.clone());
    let secret = need(take("secret", Some("RT_SMOKE_SECRET")), "secret")?;
    let agents = need(take("agents", None), "agents")?.parse()?;
    let clients = take("clients", None).map_or(Ok(12), |s| s.parse())?;
    let stop_cmd = take("stop-cmd", None).filter(|s| !s.is_empty());
    let timeout = Duration::from_secs(take("timeout-secs", None).map_or(Ok(240), |s| s.parse())?);
    if let Some(unknown) = map.keys().next() {
        return Err(format!("unknown flag --{unknown}\n{USAGE}").into());
    }
    Ok(Options {
        gateways,
        api,
        scheduler,
        api_key,
        scheduler_key,
        secret,
        agents,
        clients,
        stop_cmd,
        timeout,
    })
}

async fn resolve(url: &str) -> Result<SocketAddr, BoxError> {
    Ok(testkit::http::resolve(url).await?)
}

fn token(secret: &str, user: &str) -> Result<String, BoxError> {
    let exp = servicekit::clock::now_secs() + 3600;
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": user, "exp": exp, "kind": "app"}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// One line of the report; failures carry their reason to the exit.
fn pass(step: &str, detail: &str) {
    println!("PASS {step}: {detail}");
}

#[derive(Debug)]
struct Failed {
    step: &'static str,
    reason: String,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FAIL {}: {}", self.step, self.reason)
    }
}

impl std::error::Error for Failed {}

fn fail(step: &'static str, reason: impl Into<String>) -> BoxError {
    Box::new(Failed {
        step,
        reason: reason.into(),
    })
}

/// What a client task reports.
#[derive(Debug)]
enum ClientEvent {
    /// Connected (again) to gateway `gateway` (index), instance `instance`.
    Connected {
        client: usize,
        gateway: usize,
        instance: String,
    },
    /// Its connection ended.
    Lost { client: usize },
    /// A push frame arrived.
    Push { client: usize, body: Vec<u8> },
}

/// A client that keeps itself connected: heartbeats, and on a reconnect frame, close or
/// error it connects again, to the next gateway in the list that accepts it.
async fn client_task(
    client: usize,
    user: String,
    token: String,
    gateways: Arc<Vec<SocketAddr>>,
    events: mpsc::UnboundedSender<ClientEvent>,
) {
    let mut next = client % gateways.len();
    loop {
        let mut connected = None;
        for attempt in 0..gateways.len() * 20 {
            let index = (next + attempt) % gateways.len();
            match TestClient::connect(gateways[index], &token).await {
                Ok(c) => {
                    connected = Some((index, c));
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let Some((index, mut ws)) = connected else {
            eprintln!("rt-smoke: client {user} found no gateway accepting it");
            return;
        };
        let instance = ws.welcome.gateway.to_string();
        if events
            .send(ClientEvent::Connected {
                client,
                gateway: index,
                instance,
            })
            .is_err()
        {
            return;
        }
        let beat = Duration::from_millis(u64::from(ws.welcome.heartbeat.base_ms.max(200)) / 2);
        let mut next_beat = Instant::now() + beat;
        let mut beat_id = 0u64;
        loop {
            let wait = next_beat.saturating_duration_since(Instant::now());
            match ws.recv_within(wait).await {
                Received::Timeout => {
                    beat_id += 1;
                    ws.send(&Frame::new(FrameKind::Heartbeat).with_msg_id(beat_id))
                        .await;
                    next_beat = Instant::now() + beat;
                }
                Received::Frame(f) if f.kind == FrameKind::Push => {
                    let _ = events.send(ClientEvent::Push {
                        client,
                        body: f.body.to_vec(),
                    });
                }
                Received::Frame(f) if f.kind == FrameKind::Reconnect => break,
                Received::Frame(_) => {}
                Received::Close(_) | Received::Ended(_) => break,
            }
        }
        let _ = events.send(ClientEvent::Lost { client });
        next = (index + 1) % gateways.len();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Smoke {
    opts: Options,
    deadline: Instant,
    gateways: Arc<Vec<SocketAddr>>,
    api: SocketAddr,
    scheduler: SocketAddr,
    run: String,
}

impl Smoke {
    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline
    }

    async fn scheduler_get(&self, path: &str) -> Value {
        http::get(self.scheduler, path, &self.opts.scheduler_key)
            .await
            .map(|r| r.json())
            .unwrap_or(Value::Null)
    }

    /// Waits until the expected number of agents are online; returns their ids.
    async fn agents_online(&self, step: &'static str) -> Result<Vec<String>, BoxError> {
        let mut last = Value::Null;
        while !self.out_of_time() {
            last = self.scheduler_get("/v1/agents?state=online").await;
            let ids: Vec<String> = last["agents"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["node_id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if ids.len() >= self.opts.agents {
                pass(
                    step,
                    &format!("{} agents online: {}", ids.len(), ids.join(", ")),
                );
                return Ok(ids);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(fail(
            step,
            format!(
                "fewer than {} agents online; last: {last}",
                self.opts.agents
            ),
        ))
    }

    /// Runs `echo <marker>` on `nodes` and waits until every target succeeded with exactly
    /// one applied result.
    async fn task_on_all(
        &self,
        step: &'static str,
        nodes: &[String],
        marker: &str,
    ) -> Result<(), BoxError> {
        let body = json!({
            "targets": {"nodes": nodes},
            "spec": {"kind": "command", "argv": ["echo", marker]},
            "timeout_ms": 20_000,
            "max_attempts": 3,
        });
        let created = http::post_json(self.scheduler, "/v1/tasks", &self.opts.scheduler_key, &body)
            .await
            .map_err(|e| fail(step, format!("POST /v1/tasks: {e}")))?;
        let Some(id) = created.json()["task_id"].as_u64() else {
            return Err(fail(
                step,
                format!(
                    "POST /v1/tasks answered {}: {}",
                    created.status,
                    String::from_utf8_lossy(&created.body)
                ),
            ));
        };
        let started = Instant::now();
        let mut last = Value::Null;
        while !self.out_of_time() {
            last = self.scheduler_get(&format!("/v1/tasks/{id}")).await;
            let states: BTreeMap<String, String> = last["targets"]
                .as_object()
                .map(|t| {
                    t.iter()
                        .map(|(node, s)| {
                            let state = s["state"].as_str().or(s.as_str()).unwrap_or("?");
                            (node.clone(), state.to_owned())
                        })
                        .collect()
                })
                .unwrap_or_default();
            let bad: Vec<_> = states
                .iter()
                .filter(|(_, s)| matches!(s.as_str(), "failed" | "timed_out" | "cancelled"))
                .collect();
            if !bad.is_empty() {
                return Err(fail(step, format!("task {id}: {bad:?}; task: {last}")));
            }
            if states.len() == nodes.len() && states.values().all(|s| s == "succeeded") {
                let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
                for r in last["results"].as_array().into_iter().flatten() {
                    if r["applied"].as_bool() != Some(false)
                        && let Some(node) = r["node_id"].as_str()
                    {
                        *per_node.entry(node.to_owned()).or_default() += 1;
                    }
                }
                let missing: Vec<_> = nodes
                    .iter()
                    .filter(|n| per_node.get(*n) != Some(&1))
                    .collect();
                if !missing.is_empty() {
                    return Err(fail(
                        step,
                        format!("task {id}: not exactly one result from {missing:?}: {last}"),
                    ));
                }
                pass(
                    step,
                    &format!(
                        "task {id} succeeded on all {} agents, one result each, in {:.1} s",
                        nodes.len(),
                        started.elapsed().as_secs_f64()
                    ),
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(fail(
            step,
            format!("task {id} not finished in time; last: {last}"),
        ))
    }

    /// Waits until ws-api has seen every client's session on the gateway it is now on.
    /// Interest in a user's subject reaches the other NATS nodes with (ahead of) the
    /// gateway's connect event, so from then on a push from ws-api cannot miss; a push sent
    /// merely after the welcome may, by a route hop (protocol.md, 7.1).
    async fn wait_known(
        &self,
        step: &'static str,
        users: &[String],
        placement: &BTreeMap<usize, Option<usize>>,
        instances: &BTreeMap<usize, String>,
    ) -> Result<(), BoxError> {
        for (client, user) in users.iter().enumerate() {
            let instance = placement
                .get(&client)
                .copied()
                .flatten()
                .and_then(|g| instances.get(&g))
                .ok_or_else(|| fail(step, format!("client {client} is not connected")))?;
            loop {
                let r = http::get(self.api, &format!("/v1/users/{user}"), &self.opts.api_key)
                    .await
                    .map_err(|e| fail(step, format!("GET /v1/users/{user}: {e}")))?;
                let known = serde_json::from_slice::<serde_json::Value>(&r.body)
                    .ok()
                    .and_then(|v| v.get("gateways").cloned())
                    .and_then(|g| g.as_array().cloned())
                    .is_some_and(|g| g.iter().any(|g| g.as_str() == Some(instance)));
                if known {
                    break;
                }
                if self.out_of_time() {
                    return Err(fail(
                        step,
                        format!("ws-api never saw {user}'s session on {instance}"),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Pushes `marker` to every user through ws-api (once it knows their sessions) and
    /// waits until each client got it.
    async fn push_to_all(
        &self,
        step: &'static str,
        users: &[String],
        marker: &str,
        events: &mut mpsc::UnboundedReceiver<ClientEvent>,
        placement: &mut BTreeMap<usize, Option<usize>>,
        instances: &BTreeMap<usize, String>,
    ) -> Result<(), BoxError> {
        self.wait_known(step, users, placement, instances).await?;
        let body = json!({"target": {"users": users}, "body": marker});
        let started = Instant::now();
        let r = http::post_json(self.api, "/v1/push", &self.opts.api_key, &body)
            .await
            .map_err(|e| fail(step, format!("POST /v1/push: {e}")))?;
        if !(200..300).contains(&r.status) {
            return Err(fail(
                step,
                format!(
                    "POST /v1/push answered {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ),
            ));
        }
        let mut got: BTreeSet<usize> = BTreeSet::new();
        let needle = marker.as_bytes();
        while got.len() < users.len() {
            let event = tokio::time::timeout(self.left(), events.recv()).await;
            match event {
                Ok(Some(ClientEvent::Push { client, body })) => {
                    if body.windows(needle.len()).any(|w| w == needle) {
                        got.insert(client);
                    }
                }
                Ok(Some(ClientEvent::Connected {
                    client, gateway, ..
                })) => {
                    placement.insert(client, Some(gateway));
                }
                Ok(Some(ClientEvent::Lost { client })) => {
                    placement.insert(client, None);
                }
                Ok(None) | Err(_) => {
                    let missing: Vec<_> = (0..users.len()).filter(|c| !got.contains(c)).collect();
                    return Err(fail(
                        step,
                        format!("clients {missing:?} never got {marker}"),
                    ));
                }
            }
        }
        pass(
            step,
            &format!(
                "{} pushed through ws-api reached all {} clients in {:.2} s",
                marker,
                users.len(),
                started.elapsed().as_secs_f64()
            ),
        );
        Ok(())
    }

    /// Collects events until every client is connected to a gateway in `allowed`.
    async fn settle(
        &self,
        step: &'static str,
        events: &mut mpsc::UnboundedReceiver<ClientEvent>,
        placement: &mut BTreeMap<usize, Option<usize>>,
        instances: &mut BTreeMap<usize, String>,
        allowed: &BTreeSet<usize>,
    ) -> Result<(), BoxError> {
        loop {
            let done = placement
                .values()
                .all(|g| g.is_some_and(|g| allowed.contains(&g)));
            if done && placement.len() == self.opts.clients {
                return Ok(());
            }
            match tokio::time::timeout(self.left(), events.recv()).await {
                Ok(Some(ClientEvent::Connected {
                    client,
                    gateway,
                    instance,
                })) => {
                    placement.insert(client, Some(gateway));
                    instances.insert(gateway, instance);
                }
                Ok(Some(ClientEvent::Lost { client })) => {
                    placement.insert(client, None);
                }
                Ok(Some(ClientEvent::Push { .. })) => {}
                Ok(None) | Err(_) => {
                    return Err(fail(
                        step,
                        format!("clients not all connected: {placement:?}"),
                    ));
                }
            }
        }
    }

    async fn gateway_alive(&self, addr: SocketAddr) -> bool {
        matches!(
            tokio::time::timeout(
                Duration::from_secs(2),
                http::request(addr, "GET", "/healthz", &[], b"")
            )
            .await,
            Ok(Ok(r)) if r.status == 200
        )
    }

    /// The demo page, its library, and a development token a gateway accepts.
    async fn demo(&self, step: &'static str) -> Result<(), BoxError> {
        let page = http::request(self.api, "GET", "/demo/", &[], b"")
            .await
            .map_err(|e| fail(step, format!("GET /demo/: {e}")))?;
        let html = String::from_utf8_lossy(&page.body);
        if page.status != 200 || !html.contains("app.js") {
            return Err(fail(step, format!("GET /demo/ answered {}", page.status)));
        }
        let lib = http::request(self.api, "GET", "/demo/lib/client.js", &[], b"")
            .await
            .map_err(|e| fail(step, format!("GET /demo/lib/client.js: {e}")))?;
        if lib.status != 200 {
            return Err(fail(step, format!("the library answered {}", lib.status)));
        }
        let user = format!("{}-demo", self.run);
        let r = http::request(
            self.api,
            "POST",
            "/demo/token",
            &[("content-type", "application/json")],
            json!({"user": user}).to_string().as_bytes(),
        )
        .await
        .map_err(|e| fail(step, format!("POST /demo/token: {e}")))?;
        let token = r.json()["token"].as_str().unwrap_or_default().to_owned();
        if r.status != 200 || token.is_empty() {
            return Err(fail(
                step,
                format!("POST /demo/token answered {}", r.status),
            ));
        }
        let client = TestClient::connect(self.gateways[0], &token)
            .await
            .map_err(|e| fail(step, format!("a gateway refused the demo token: {e:?}")))?;
        drop(client);
        pass(
            step,
            "page and library served; a development token connects",
        );
        Ok(())
    }

    async fn run(&self) -> Result<(), BoxError> {
        self.demo("demo").await?;
        // 1-2: the fleet.
        let agents = self.agents_online("agents").await?;
        self.task_on_all("task", &agents, &format!("{}-task-1", self.run))
            .await?;

        // 3: clients spread over the gateways.
        let (tx, mut events) = mpsc::unbounded_channel();
        let users: Vec<String> = (0..self.opts.clients)
            .map(|i| format!("{}-user-{i}", self.run))
            .collect();
        let mut tasks = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let token = token(&self.opts.secret, user)?;
            tasks.push(tokio::spawn(client_task(
                i,
                user.clone(),
                token,
                Arc::clone(&self.gateways),
                tx.clone(),
            )));
        }
        drop(tx);
        let all: BTreeSet<usize> = (0..self.gateways.len()).collect();
        let mut placement: BTreeMap<usize, Option<usize>> = BTreeMap::new();
        let mut instances: BTreeMap<usize, String> = BTreeMap::new();
        self.settle("connect", &mut events, &mut placement, &mut instances, &all)
            .await?;
        let spread = |placement: &BTreeMap<usize, Option<usize>>| {
            let mut per: BTreeMap<usize, usize> = BTreeMap::new();
            for g in placement.values().flatten() {
                *per.entry(*g).or_default() += 1;
            }
            per.iter()
                .map(|(g, n)| format!("{}={n}", self.gateways[*g]))
                .collect::<Vec<_>>()
                .join(" ")
        };
        pass(
            "connect",
            &format!(
                "{} clients connected over {} gateways: {}",
                self.opts.clients,
                self.gateways.len(),
                spread(&placement)
            ),
        );

        // 4: a push reaches everyone.
        self.push_to_all(
            "push",
            &users,
            &format!("{}-push-1", self.run),
            &mut events,
            &mut placement,
            &instances,
        )
        .await?;

        // 5: one gateway goes away.
        if let Some(cmd) = &self.opts.stop_cmd {
            let before = placement.clone();
            println!("rt-smoke: running stop command: {cmd}");
            let status = tokio::time::timeout(
                self.left(),
                tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(cmd)
                    .status(),
            )
            .await
            .map_err(|_| fail("stop", "stop command did not finish in time"))?
            .map_err(|e| fail("stop", format!("stop command: {e}")))?;
            if !status.success() {
                return Err(fail("stop", format!("stop command exited with {status}")));
            }
            // The command may return before the gateway is gone (a drain takes a moment).
            let give_up = Instant::now() + Duration::from_secs(30);
            let (alive, stopped) = loop {
                let mut alive = BTreeSet::new();
                for (i, addr) in self.gateways.iter().enumerate() {
                    if self.gateway_alive(*addr).await {
                        alive.insert(i);
                    }
                }
                let stopped: Vec<_> = all.difference(&alive).copied().collect();
                if !stopped.is_empty() {
                    break (alive, stopped);
                }
                if Instant::now() >= give_up || self.out_of_time() {
                    return Err(fail(
                        "stop",
                        "every gateway still answers /healthz 30 s after the stop command",
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            if alive.is_empty() {
                return Err(fail("stop", "no gateway is left"));
            }
            let moving: Vec<usize> = before
                .iter()
                .filter(|(_, g)| g.is_some_and(|g| stopped.contains(&g)))
                .map(|(c, _)| *c)
                .collect();
            let started = Instant::now();
            self.settle(
                "failover",
                &mut events,
                &mut placement,
                &mut instances,
                &alive,
            )
            .await?;
            pass(
                "failover",
                &format!(
                    "stopped {}; its {} clients reconnected to the others in {:.1} s; now {}",
                    stopped
                        .iter()
                        .map(|g| self.gateways[*g].to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    moving.len(),
                    started.elapsed().as_secs_f64(),
                    spread(&placement)
                ),
            );
            self.push_to_all(
                "push-after-failover",
                &users,
                &format!("{}-push-2", self.run),
                &mut events,
                &mut placement,
                &instances,
            )
            .await?;
            let agents_again = self.agents_online("agents-after-failover").await?;
            let _ = agents_again;
            self.task_on_all(
                "task-after-failover",
                &agents,
                &format!("{}-task-2", self.run),
            )
            .await?;
        }
        for t in tasks {
            t.abort();
        }
        Ok(())
    }
}

async fn main_async() -> Result<(), BoxError> {
    let opts = parse_args()?;
    if opts.gateways.is_empty() || opts.clients == 0 {
        return Err(format!("need at least one gateway and one client\n{USAGE}").into());
    }
    let mut gateways = Vec::new();
    for g in &opts.gateways {
        gateways.push(resolve(g).await?);
    }
    let api = resolve(&opts.api).await?;
    let scheduler = resolve(&opts.scheduler).await?;
    let run = format!("smoke{}", servicekit::clock::now_ms() % 1_000_000_000);
    let smoke = Smoke {
        deadline: Instant::now() + opts.timeout,
        opts,
        gateways: Arc::new(gateways),
        api,
        scheduler,
        run,
    };
    println!(
        "rt-smoke: {} gateways, ws-api {}, scheduler {}, {} agents expected, {} clients, {} s budget",
        smoke.gateways.len(),
        smoke.api,
        smoke.scheduler,
        smoke.opts.agents,
        smoke.opts.clients,
        smoke.opts.timeout.as_secs()
    );
    smoke.run().await
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            println!("FAIL setup: {e}");
            return ExitCode::from(2);
        }
    };
    let started = std::time::Instant::now();
    match runtime.block_on(main_async()) {
        Ok(()) => {
            println!(
                "PASS rt-smoke: all steps passed in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            runtime.shutdown_timeout(Duration::from_secs(1));
            ExitCode::SUCCESS
        }
        Err(e) => {
            if e.downcast_ref::<Failed>().is_some() {
                println!("{e}");
            } else {
                println!("FAIL rt-smoke: {e}");
            }
            println!(
                "FAIL rt-smoke: stopped after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            runtime.shutdown_timeout(Duration::from_secs(1));
            ExitCode::FAILURE
        }
    }
}
