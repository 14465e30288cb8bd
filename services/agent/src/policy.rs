//! What a task may do on this machine: the rules the executor checks before it runs a
//! command or opens a probe connection.
//!
//! This module owns the execution policy ([`ExecPolicy`]) and every rule in it, so the
//! executor only asks "may this run, and how" and the configuration only validates values:
//!
//! - **Program.** `argv[0]` is looked up on the configured search path, never on the task's
//!   or the agent's own `PATH`. A bare allowlist entry (`df`) matches a bare `argv[0]` and
//!   runs the file found first on the search path; an absolute entry (`/usr/bin/df`)
//!   matches that exact `argv[0]`. An `argv[0]` with a slash that is not absolute (`./x`,
//!   `a/b`) is refused: what it names depends on the working directory.
//! - **Environment.** The child starts from an empty environment plus `PATH` (the search
//!   path) and `LANG=C.UTF-8`; the task may add variables whose names are on
//!   `allowed_env` (empty by default). Names that change how programs are loaded or how
//!   shells start (`LD_*`, `DYLD_*`, `PATH`, `IFS`, `BASH_ENV`, `GLIBC_TUNABLES`,
//!   `PYTHONPATH`, ...: [`is_forbidden_env`]) are refused even if configured. A task that
//!   asks for a variable it may not set is refused as a whole rather than run without it:
//!   a command run in a different environment from the one asked for is a surprise.
//! - **Working directory.** A task's `cwd` must be absolute and canonicalize (symlinks
//!   resolved) to a directory under one of `allowed_cwd_roots` (none by default, so a task
//!   with a `cwd` is refused). A task without one runs in `/`, not in the agent's own
//!   directory (which holds its token and outbox).
//! - **Caps.** At most `max_concurrent_tasks` tasks run at once (more are refused at once,
//!   not queued: the scheduler's retry policy decides what happens next); a task whose
//!   `timeout_ms` is above `max_timeout` is refused.
//! - **Probe destinations.** Each address a probe would connect to is checked against
//!   `probe_allow`, `probe_deny` and the built-in deny list ([`BUILTIN_PROBE_DENY`]:
//!   link-local and cloud metadata addresses). The most specific matching range decides;
//!   at equal prefix length `probe_deny` beats `probe_allow`, which beats the built-in
//!   list. An address no range matches is allowed.
//!
//! A refusal is a [`Refusal`]; the executor reports it as a failed result whose error
//! starts with `refused:`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The default command search path (the usual root `PATH`).
pub(crate) const DEFAULT_SEARCH_PATH: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Default cap on tasks running at once.
pub(crate) const DEFAULT_MAX_CONCURRENT_TASKS: usize = 16;

/// Default cap on a task's timeout.
pub(crate) const DEFAULT_MAX_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// A task with a zero timeout gets this one (or the cap, if lower): "no timeout" is not
/// something an edge machine should accept from the network.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `LANG` in every child's environment: a UTF-8 locale that exists on every glibc system
/// (and falls back to `C` where it does not), so output is not locale roulette.
pub(crate) const CHILD_LANG: &str = "C.UTF-8";

/// Ranges the probes refuse unless `probe_allow` names them: IPv4 link-local (which holds
/// 169.254.169.254, the AWS, GCP, Azure and OpenStack metadata service), IPv6 link-local,
/// AWS's IPv6 metadata address and Alibaba Cloud's metadata address.
pub(crate) const BUILTIN_PROBE_DENY: [&str; 4] = [
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
];

/// Environment variable names a task may never set, whatever `allowed_env` says: they
/// change what a program loads or what a shell runs before the command.
const FORBIDDEN_ENV: [&str; 37] = [
    "PATH",
    // Shells.
    "IFS",
    "ENV",
    "BASH_ENV",
    "SHELLOPTS",
    "BASHOPTS",
    "PS4",
    "PROMPT_COMMAND",
    "CDPATH",
    "GLOBIGNORE",
    "HISTFILE",
    // glibc (its list of variables unsafe for setuid programs) and the loader.
    "GLIBC_TUNABLES",
    "GCONV_PATH",
    "GETCONF_DIR",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TZDIR",
    // Interpreters that load code named by the environment.
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONINSPECT",
    "PERL5LIB",
    "PERL5OPT",
    "PERLLIB",
    "RUBYLIB",
    "RUBYOPT",
    "NODE_OPTIONS",
    "NODE_PATH",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS",
];

/// Prefixes of forbidden names: the dynamic loaders (`LD_PRELOAD`, `LD_LIBRARY_PATH`,
/// `LD_AUDIT`, ...; `DYLD_*` on macOS) and bash's exported functions.
const FORBIDDEN_ENV_PREFIXES: [&str; 3] = ["LD_", "DYLD_", "BASH_FUNC_"];

/// Whether `name` is one a task may never set (compared case-insensitively).
pub(crate) fn is_forbidden_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    FORBIDDEN_ENV.contains(&upper.as_str())
        || FORBIDDEN_ENV_PREFIXES.iter().any(|p| upper.starts_with(p))
}

/// Whether `name` is a portable environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why a task is not run (or a probe not connected).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The task has no argv.
    #[error("empty argv")]
    EmptyArgv,
    /// `argv[0]` is relative with a slash, empty, or has a NUL byte.
    #[error("program {0:?} must be a bare name or an absolute path")]
    ProgramForm(String),
    /// `argv[0]` is not on `allowed_commands`.
    #[error("program {0:?} is not on allowed_commands")]
    NotAllowed(String),
    /// A bare name that no directory of the search path has as an executable file.
    #[error("program {program:?} is not in command_search_path ({path})")]
    NotFound {
        /// The program asked for.
        program: String,
        /// The search path, `:`-joined.
        path: String,
    },
    /// An argument has a NUL byte (it cannot be passed to a program).
    #[error("argument {0} contains a NUL byte")]
    ArgNul(usize),
    /// An environment variable name that is never allowed.
    #[error("environment variable {0} may never be set by a task")]
    ForbiddenEnv(String),
    /// An environment variable name not on `allowed_env`.
    #[error("environment variable {0:?} is not on allowed_env")]
    EnvNotAllowed(String),
    /// An environment variable value with a NUL byte.
    #[error("environment variable {0} has a NUL byte in its value")]
    EnvValue(String),
    /// `allowed_cwd_roots` is empty, so no task may choose its directory.
    #[error("cwd {0:?} is not allowed (allowed_cwd_roots is empty)")]
    CwdNotAllowed(String),
    /// A relative `cwd`.
    #[error("cwd {0:?} must be an absolute path")]
    CwdRelative(String),
    /// A `cwd` that does not resolve to an existing directory.
    #[error("cwd {cwd:?}: {reason}")]
    CwdInvalid {
        /// The directory asked for.
        cwd: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A `cwd` that resolves outside every allowed root.
    #[error("cwd {cwd:?} resolves to {resolved} which is outside allowed_cwd_roots")]
    CwdOutside {
        /// The directory asked for.
        cwd: String,
        /// Where it leads after resolving symlinks and `..`.
        resolved: String,
    },
    /// `timeout_ms` above the cap.
    #[error("timeout_ms {asked} is above max_timeout_ms {max}")]
    Timeout {
        /// The task's timeout.
        asked: u64,
        /// The cap.
        max: u64,
    },
    /// Too many tasks are running.
    #[error("{0} tasks are already running (max_concurrent_tasks)")]
    Busy(usize),
    /// A probe URL or target with characters that could change the request (CR, LF,
    /// spaces, other control or non-ASCII characters).
    #[error("probe target {0:?} contains whitespace, control or non-ASCII characters")]
    ProbeCharacters(String),
    /// A probe destination in a denied range.
    #[error("probe destination {addr} is in denied range {range} ({list})")]
    ProbeDenied {
        /// The resolved address.
        addr: IpAddr,
        /// The range that denies it.
        range: Cidr,
        /// Which list the range is on.
        list: &'static str,
    },
}

/// An IP network (`10.0.0.0/8`, `fe80::/10`; a bare address is a single host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

/// Why a CIDR does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// The address part is not an IP address.
    #[error("{0:?} is not an IP address or CIDR range (e.g. 10.0.0.0/8, fe80::/10)")]
    Address(String),
    /// The prefix length is not a number in range.
    #[error("{0:?} has an invalid prefix length")]
    Prefix(String),
    /// Bits are set after the prefix, which usually means a typo.
    #[error("{text:?} has bits set after the prefix (did you mean {suggestion}?)")]
    HostBits {
        /// The text given.
        text: String,
        /// The network with the host bits cleared.
        suggestion: Cidr,
    },
}

impl Cidr {
    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.net
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                mask_v4(ip, self.prefix) == u32::from(net) && self.prefix <= 32
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                mask_v6(ip, self.prefix) == u128::from(net) && self.prefix <= 128
            }
            _ => false,
        }
    }
}

fn mask_v4(ip: Ipv4Addr, prefix: u8) -> u32 {
    let bits = u32::from(ip);
    match prefix {
        0 => 0,
        p if p >= 32 => bits,
        p => bits & (u32::MAX << (32 - u32::from(p))),
    }
}

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> u128 {
    let bits = u128::from(ip);
    match prefix {
        0 => 0,
        p if p >= 128 => bits,
        p => bits & (u128::MAX << (128 - u32::from(p))),
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(text: &str) -> Result<Cidr, CidrError> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(text.to_owned()))?;
        // A v4-mapped v6 range would never match: addresses are compared in canonical form.
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(CidrError::Prefix(text.to_owned())),
            },
        };
        let masked = match net {
            IpAddr::V4(v4) => IpAddr::V4(Ipv4Addr::from(mask_v4(v4, prefix))),
            IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(mask_v6(v6, prefix))),
        };
        if masked != net {
            return Err(CidrError::HostBits {
                text: text.to_owned(),
                suggestion: Cidr {
                    net: masked,
                    prefix,
                },
            });
        }
        Ok(Cidr { net, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.prefix)
    }
}

/// The rules a task is checked against. Built from the agent configuration
/// ([`crate::AgentConfig::exec_policy`]); [`ExecPolicy::default`] allows no commands.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecPolicy {
    /// Programs a command task may run: bare names or absolute paths.
    pub allowed_commands: Vec<String>,
    /// Absolute directories searched for bare program names, in order; also the child's
    /// `PATH`.
    pub search_path: Vec<PathBuf>,
    /// Environment variable names a task may set.
    pub allowed_env: BTreeSet<String>,
    /// Directories under which a task's `cwd` must resolve.
    pub allowed_cwd_roots: Vec<PathBuf>,
    /// Most tasks running at once (at least 1).
    pub max_concurrent_tasks: usize,
    /// Longest timeout a task may ask for.
    pub max_timeout: Duration,
    /// Ranges probes may reach even if the built-in list denies them.
    pub probe_allow: Vec<Cidr>,
    /// Ranges probes may not reach.
    pub probe_deny: Vec<Cidr>,
}

impl Default for ExecPolicy {
    fn default() -> Self {
        ExecPolicy {
            allowed_commands: Vec::new(),
            search_path: DEFAULT_SEARCH_PATH.iter().map(PathBuf::from).collect(),
            allowed_env: BTreeSet::new(),
            allowed_cwd_roots: Vec::new(),
            max_concurrent_tasks: DEFAULT_MAX_CONCURRENT_TASKS,
            max_timeout: DEFAULT_MAX_TIMEOUT,
            probe_allow: Vec::new(),
            probe_deny: Vec::new(),
        }
    }
}

/// The checked parts of a command task, ready to spawn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The file to execute (absolute).
    pub program: PathBuf,
    /// `argv[0]` as the task gave it (a bare name stays bare, as a shell would pass it).
    pub arg0: String,
    /// The child's whole environment.
    pub env: Vec<(String, String)>,
    /// The directory to run in (canonical).
    pub cwd: PathBuf,
}

impl ExecPolicy {
    /// The default policy allowing `commands`.
    pub fn with_commands(commands: impl IntoIterator<Item = impl Into<String>>) -> Self {
        ExecPolicy {
            allowed_commands: commands.into_iter().map(Into::into).collect(),
            ..ExecPolicy::default()
        }
    }

    /// The search path as a `PATH` value.
    pub fn path_var(&self) -> String {
        self.search_path
            .iter()
            .map(|p| p.to_string_lossy())
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Checks a command task and works out what to execute, with which environment and
    /// where. Reads the file system (program lookup, `cwd` canonicalization), so call it
    /// off the async threads.
    pub fn prepare(
        &self,
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: Option<&str>,
    ) -> Result<Prepared, Refusal> {
        let program = argv.first().ok_or(Refusal::EmptyArgv)?;
        if let Some(i) = argv.iter().skip(1).position(|a| a.contains('\0')) {
            return Err(Refusal::ArgNul(i + 1));
        }
        let resolved = self.resolve_program(program)?;
        let env = self.child_env(env)?;
        let cwd = match cwd {
            Some(cwd) => self.check_cwd(cwd)?,
            None => PathBuf::from("/"),
        };
        Ok(Prepared {
            program: resolved,
            arg0: program.clone(),
            env,
            cwd,
        })
    }

    /// The file `program` (a task's `argv[0]`) runs, if it is allowed.
    pub fn resolve_program(&self, program: &str) -> Result<PathBuf, Refusal> {
        if program.is_empty()
            || program.contains('\0')
            || (program.contains('/') && !program.starts_with('/'))
            || program == "."
            || program == ".."
        {
            return Err(Refusal::ProgramForm(program.to_owned()));
        }
        if !self.allowed_commands.iter().any(|a| a == program) {
            return Err(Refusal::NotAllowed(program.to_owned()));
        }
        if program.starts_with('/') {
            return Ok(PathBuf::from(program));
        }
        self.search_path
            .iter()
            .map(|dir| dir.join(program))
            .find(|candidate| is_executable_file(candidate))
            .ok_or_else(|| Refusal::NotFound {
                program: program.to_owned(),
                path: self.path_var(),
            })
    }

    /// The child's environment: the fixed base plus the task's allowed variables.
    pub fn child_env(
        &self,
        task_env: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, String)>, Refusal> {
        let mut env = vec![
            ("PATH".to_owned(), self.path_var()),
            ("LANG".to_owned(), CHILD_LANG.to_owned()),
        ];
        for (name, value) in task_env {
            // Forbidden is checked first so the error says "never", not "not configured".
            if is_forbidden_env(name) {
                return Err(Refusal::ForbiddenEnv(name.clone()));
            }
            if !self.allowed_env.contains(name) {
                return Err(Refusal::EnvNotAllowed(name.clone()));
            }
            if value.contains('\0') {
                return Err(Refusal::EnvValue(name.clone()));
            }
            env.retain(|(n, _)| n != name);
            env.push((name.clone(), value.clone()));
        }
        Ok(env)
    }

    /// The canonical directory `cwd` names, if it lies under an allowed root.
    pub fn check_cwd(&self, cwd: &str) -> Result<PathBuf, Refusal> {
        if self.allowed_cwd_roots.is_empty() {
            return Err(Refusal::CwdNotAllowed(cwd.to_owned()));
        }
        if !cwd.starts_with('/') {
            return Err(Refusal::CwdRelative(cwd.to_owned()));
        }
        let invalid = |reason: String| Refusal::CwdInvalid {
            cwd: cwd.to_owned(),
            reason,
        };
        if cwd.contains('\0') {
            return Err(invalid("contains a NUL byte".to_owned()));
        }
        let resolved = std::fs::canonicalize(cwd).map_err(|e| invalid(e.to_string()))?;
        // Roots are resolved too: a root configured through a symlink (/srv -> /data/srv)
        // must still contain its own subdirectories.
        let inside = self
            .allowed_cwd_roots
            .iter()
            .filter_map(|root| std::fs::canonicalize(root).ok())
            .any(|root| resolved.starts_with(root));
        if !inside {
            return Err(Refusal::CwdOutside {
                cwd: cwd.to_owned(),
                resolved: resolved.display().to_string(),
            });
        }
        if !resolved.is_dir() {
            return Err(invalid("not a directory".to_owned()));
        }
        Ok(resolved)
    }

    /// The timeout for a task asking for `timeout_ms` (0: [`DEFAULT_TIMEOUT`], or the cap
    /// if that is lower).
    pub fn timeout_for(&self, timeout_ms: u64) -> Result<Duration, Refusal> {
        if timeout_ms == 0 {
            return Ok(DEFAULT_TIMEOUT.min(self.max_timeout));
        }
        let asked = Duration::from_millis(timeout_ms);
        if asked > self.max_timeout {
            return Err(Refusal::Timeout {
                asked: timeout_ms,
                max: u64::try_from(self.max_timeout.as_millis()).unwrap_or(u64::MAX),
            });
        }
        Ok(asked)
    }

    /// Whether a probe may connect to `addr`.
    pub fn check_probe_addr(&self, addr: IpAddr) -> Result<(), Refusal> {
        // (prefix, rank, range, list): the longest prefix wins, then the highest rank.
        let mut best: Option<(u8, u8, Cidr, &'static str)> = None;
        let builtin = BUILTIN_PROBE_DENY
            .iter()
            .filter_map(|c| c.parse::<Cidr>().ok())
            .map(|c| (c, 0u8, "built-in deny list"));
        let allow = self.probe_allow.iter().map(|c| (*c, 1u8, "probe_allow"));
        let deny = self.probe_deny.iter().map(|c| (*c, 2u8, "probe_deny"));
        for (range, rank, list) in builtin.chain(allow).chain(deny) {
            if !range.contains(addr) {
                continue;
            }
            let better = match best {
                None => true,
                Some((p, r, _, _)) => (range.prefix, rank) > (p, r),
            };
            if better {
                best = Some((range.prefix, rank, range, list));
            }
        }
        match best {
            Some((_, rank, range, list)) if rank != 1 => Err(Refusal::ProbeDenied {
                addr: addr.to_canonical(),
                range,
                list,
            }),
            _ => Ok(()),
        }
    }
}

/// Whether `path` is a regular file (after symlinks) with an execute bit set.
fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Checks that a probe URL or target has only printable ASCII and no spaces, so nothing in
/// it can end a request line or add a header.
pub fn check_probe_text(text: &str) -> Result<(), Refusal> {
    if text.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Refusal::ProbeCharacters(text.to_owned()))
    }
}

/// Whether `host` is a host name (letters, digits, `-`, `_`, `.`) or an IP literal
/// (without brackets).
pub(crate) fn is_probe_host(host: &str) -> bool {
    !host.is_empty()
        && (host.parse::<IpAddr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        assert!(cidr("10.0.0.0/8").contains("10.1.2.3".parse().unwrap()));
        assert!(!cidr("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("1.2.3.4".parse().unwrap()));
        assert!(!cidr("0.0.0.0/0").contains("::1".parse().unwrap()));
        assert!(cidr("::/0").contains("::1".parse().unwrap()));
        assert!(cidr("fe80::/10").contains("fe80::1".parse().unwrap()));
        assert!(cidr("fe80::/10").contains("febf::1".parse().unwrap()));
        assert!(!cidr("fe80::/10").contains("fec0::1".parse().unwrap()));
        assert_eq!(cidr("1.2.3.4").prefix(), 32);
        // Mapped addresses are compared as IPv4.
        assert!(cidr("169.254.0.0/16").contains("::ffff:169.254.169.254".parse().unwrap()));
        assert_eq!(cidr("::ffff:10.0.0.0/8"), cidr("10.0.0.0/8"));
        assert_eq!(cidr("fd00:ec2::254/128").to_string(), "fd00:ec2::254/128");
        for bad in ["", "x", "10.0.0.0/33", "10.0.0.0/", "10.0.0.0/-1", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert!(matches!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits { suggestion, .. }) if suggestion == cidr("10.0.0.0/8")
        ));
    }

    #[test]
    fn the_most_specific_range_decides() {
        let p = ExecPolicy {
            probe_allow: vec![cidr("169.254.169.254"), cidr("10.0.0.0/8")],
            probe_deny: vec![cidr("10.9.0.0/16"), cidr("192.168.1.1")],
            ..ExecPolicy::default()
        };
        let ok = |s: &str| p.check_probe_addr(s.parse().unwrap()).is_ok();
        assert!(ok("169.254.169.254"));
        assert!(!ok("169.254.1.1"));
        assert!(ok("10.1.1.1"));
        assert!(!ok("10.9.1.1"));
        assert!(!ok("192.168.1.1"));
        assert!(ok("127.0.0.1"));
        assert!(!ok("fe80::1"));
        assert!(!ok("fd00:ec2::254"));
        assert!(!ok("100.100.100.200"));
        // At equal length the operator's lists beat the built-in one, and deny beats allow.
        let p = ExecPolicy {
            probe_allow: vec![cidr("169.254.0.0/16"), cidr("10.0.0.0/8")],
            probe_deny: vec![cidr("10.0.0.0/8")],
            ..ExecPolicy::default()
        };
        assert!(p.check_probe_addr("169.254.1.1".parse().unwrap()).is_ok());
        assert!(p.check_probe_addr("10.0.0.1".parse().unwrap()).is_err());
    }

    #[test]
    fn env_names() {
        for name in [
            "LD_PRELOAD",
            "ld_preload",
            "PATH",
            "DYLD_INSERT_LIBRARIES",
            "BASH_ENV",
        ] {
            assert!(is_forbidden_env(name), "{name}");
        }
        for name in ["LANG", "TZ", "HOME", "MY_VAR"] {
            assert!(!is_forbidden_env(name), "{name}");
        }
        assert!(is_env_name("_A1"));
        for bad in ["", "1A", "A-B", "A=B", "A B"] {
            assert!(!is_env_name(bad), "{bad}");
        }
    }

    #[test]
    fn timeouts() {
        let p = ExecPolicy {
            max_timeout: Duration::from_secs(10),
            ..ExecPolicy::default()
        };
        assert_eq!(p.timeout_for(0), Ok(Duration::from_secs(10)));
        assert_eq!(p.timeout_for(10_000), Ok(Duration::from_secs(10)));
        assert!(matches!(
            p.timeout_for(10_001),
            Err(Refusal::Timeout { .. })
        ));
        assert_eq!(ExecPolicy::default().timeout_for(0), Ok(DEFAULT_TIMEOUT));
    }

    #[test]
    fn probe_text_and_hosts() {
        assert!(check_probe_text("http://a/b?c=d").is_ok());
        for bad in [
            "http://a/\r\nX: y",
            "http://a/ b",
            "http://a/\t",
            "http://a/é",
        ] {
            assert!(check_probe_text(bad).is_err(), "{bad:?}");
        }
        assert!(is_probe_host("example.com"));
        assert!(is_probe_host("::1"));
        assert!(!is_probe_host("a b"));
        assert!(!is_probe_host(""));
        assert!(!is_probe_host("a%b"));
    }
}
