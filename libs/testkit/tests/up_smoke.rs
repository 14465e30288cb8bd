//! `scripts/up` (the local, no-Docker topology) passes the same smoke scenario as the
//! compose stack: agents register, a task runs on all, pushes reach clients on every
//! gateway, one gateway is stopped and its clients move with nothing lost. Then Ctrl-C
//! (SIGINT) stops everything cleanly.
//!
//! Runs `scripts/up` on free ports with its state in a temporary directory, with debug
//! binaries (UP_PROFILE=debug: the test build has made most of them already).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testkit::workspace_root;

/// Building the services (when the test build has not) can take a while on 2 cores.
const UP_START: Duration = Duration::from_secs(900);

/// Kills the whole process group if the test fails half-way.
struct Up {
    child: Child,
    done: bool,
}

impl Drop for Up {
    fn drop(&mut self) {
        if !self.done {
            let pgid = format!("-{}", self.child.id());
            let _ = Command::new("kill").args(["-KILL", "--", &pgid]).status();
            let _ = self.child.wait();
        }
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let holders: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    holders
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn scripts_up_passes_the_smoke_scenario_and_stops_cleanly_on_ctrl_c() {
    let root = workspace_root();
    let dir = tempfile::Builder::new()
        .prefix("up-smoke-")
        .tempdir()
        .unwrap();
    let run = dir.path().join("run");
    let out = dir.path().join("up.out");
    let ports = free_ports(7);
    let (nats, monitor, api, scheduler) = (ports[0], ports[1], ports[2], ports[3]);
    let gateways = &ports[4..7];
    let gateway_list = gateways
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(" ");

    let child = Command::new("bash")
        .arg(root.join("scripts/up"))
        .current_dir(&root)
        .env("UP_NATS_PORT", nats.to_string())
        .env("UP_NATS_MONITOR_PORT", monitor.to_string())
        .env("UP_API_PORT", api.to_string())
        .env("UP_SCHEDULER_PORT", scheduler.to_string())
        .env("UP_GATEWAY_PORTS", &gateway_list)
        .env("UP_AGENTS", "3")
        .env("UP_RUN_DIR", &run)
        .env("UP_PROFILE", "debug")
        .env("UP_KEEP_GOING", "1")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.path().join("up.err")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut up = Up { child, done: false };

    let started = Instant::now();
    while !read(&out).contains("up: running") {
        if let Some(status) = up.child.try_wait().unwrap() {
            panic!(
                "scripts/up exited ({status}) before it was running:\n{}\n{}",
                read(&out),
                read(&dir.path().join("up.err"))
            );
        }
        assert!(
            started.elapsed() < UP_START,
            "scripts/up not running after {UP_START:?}:\n{}",
            read(&out)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let secret = read(&run.join("dev-hs256-secret"));
    let key = read(&run.join("dev-api-key"));
    // The scheduler has its own keys; rt-smoke creates tasks, so it needs the operator one.
    let scheduler_key = read(&run.join("scheduler-operator-key"));
    let victim = read(&run.join("pids/ws-gateway-1.pid")).trim().to_owned();
    assert!(!secret.is_empty() && !key.is_empty() && !victim.is_empty());
    assert!(!scheduler_key.is_empty() && scheduler_key != key);
    let gateway_urls = gateways
        .iter()
        .map(|p| format!("ws://127.0.0.1:{p}/ws"))
        .collect::<Vec<_>>()
        .join(",");
    let smoke = Command::new(env!("CARGO_BIN_EXE_rt-smoke"))
        .args(["--gateways", &gateway_urls])
        .args(["--api", &format!("http://127.0.0.1:{api}")])
        .args(["--scheduler", &format!("http://127.0.0.1:{scheduler}")])
        .args(["--agents", "3", "--clients", "9", "--timeout-secs", "180"])
        .args(["--stop-cmd", &format!("kill -TERM {victim}")])
        .env("RT_SMOKE_API_KEY", &key)
        .env("RT_SMOKE_SCHEDULER_KEY", &scheduler_key)
        .env("RT_SMOKE_SECRET", &secret)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&smoke.stdout);
    println!("{report}");
    assert!(
        smoke.status.success() && report.contains("PASS rt-smoke"),
        "rt-smoke failed:\n{report}\n{}\nlogs in {}",
        String::from_utf8_lossy(&smoke.stderr),
        run.join("logs").display()
    );
    assert!(report.contains("PASS failover"), "{report}");
    assert!(!listening(gateways[0]), "the stopped gateway still listens");

    // Ctrl-C: everything stops, the script says so and exits 0.
    let status = Command::new("kill")
        .args(["-INT", &up.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopping = Instant::now();
    let exit = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(60),
            "scripts/up did not stop within 60 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    up.done = true;
    let printed = read(&out);
    assert!(exit.success(), "scripts/up exited with {exit}:\n{printed}");
    assert!(printed.contains("up: stopped"), "{printed}");
    for port in [nats, api, scheduler, gateways[1], gateways[2]] {
        assert!(!listening(port), "port {port} still open after Ctrl-C");
    }
    // Every process it started is gone.
    for entry in std::fs::read_dir(run.join("pids")).unwrap() {
        let pid = read(&entry.unwrap().path()).trim().to_owned();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || read(Path::new(&format!("/proc/{pid}/stat"))).contains(") Z "),
            "process {pid} still running after Ctrl-C"
        );
    }
}
