//! Service binaries run as real processes: built on demand and killed with SIGKILL when
//! their guard drops, so a failing test leaves nothing running. Output goes to a log file
//! the test can print when it fails.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use crate::server::workspace_root;

/// The path of workspace binary `bin` of `package`, built in the debug profile first.
///
/// Every binary of the workspace is built with one `cargo build --workspace --bins`, once
/// per test process: that is exactly what the test runner already built (integration
/// tests bring their packages' binaries, with workspace-wide feature unification), so it
/// is a no-op in the suite. Building one package alone (`-p`) would resolve features
/// differently and relink every binary, some 25 s each on the CI machine, enough to push
/// the end-to-end tests past their time limit.
pub fn binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        // The test runner sets CARGO_MANIFEST_DIR (and the other package variables) to the
        // test's package; ring's build script reruns when CARGO_MANIFEST_DIR changes, so
        // inheriting it would rebuild the TLS stack on every run (docs/dependencies.md,
        // trap 12).
        let mut command = Command::new(cargo);
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if name.starts_with("CARGO_MANIFEST_") || name.starts_with("CARGO_PKG_") {
                command.env_remove(name.as_ref());
            }
        }
        match command
            .args(["build", "-q", "--workspace", "--bins"])
            .current_dir(workspace_root())
            .status()
        {
            Ok(s) if s.success() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    match built {
        Ok(()) => target.join("debug").join(bin),
        Err(e) => panic!("building the workspace binaries (for {package}/{bin}) failed: {e}"),
    }
}

/// A free loopback address (bound and released; good enough for tests).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// A running service process, killed when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program` with `env` (on top of the inherited environment) and `args`, its
    /// stdout and stderr in `log`.
    pub fn start(program: &Path, args: &[&str], env: &[(&str, String)], log: PathBuf) -> Self {
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = file
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone a log handle: {e}"));
        let mut command = Command::new(program);
        command
            .args(args)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process { child, log }
    }

    /// Sends SIGTERM and waits for the process to exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> bool {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
