//! Agent configuration: a complete file, environment overrides, and each class of error.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::{AgentConfig, BackoffError, ConfigError, Origin, Problem, RelayListen};

const GOOD: &str = r#"
node_id = "edge-berlin-17"
token_file = "token"
gateways = ["ws://127.0.0.1:8081/ws", "wss://gw2.example/ws"]
outbox_path = "state/outbox.redb"
report_period_secs = 15
heartbeat_secs = 10
allowed_commands = ["/usr/bin/uptime", "df"]

[labels]
region = "eu-central"
rack = "r17"

[backoff]
base_ms = 200
cap_ms = 10000
jitter = 0.5
"#;

const MINIMAL: &str = r#"
node_id = "n1"
token = "secret"
gateways = ["ws://127.0.0.1:8081/ws"]
outbox_path = "/var/lib/agent/outbox.redb"
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |k| map.get(k).cloned()
}

/// Writes `text` as agent.toml (and a token file) into a fresh directory.
fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "tok-from-file\n").unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn load(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<AgentConfig, ConfigError> {
    let (_dir, path) = write_config(text);
    AgentConfig::load(Some(&path), env)
}

#[test]
fn good_file_loads_with_every_field() {
    let (dir, path) = write_config(GOOD);
    let c = AgentConfig::load(Some(&path), no_env).unwrap();
    assert_eq!(c.node_id.as_str(), "edge-berlin-17");
    assert_eq!(
        c.token.expose(),
        "tok-from-file",
        "trailing newline trimmed"
    );
    // Relative paths in the file are relative to the file's directory.
    assert_eq!(
        c.token_file.as_deref(),
        Some(dir.path().join("token").as_path())
    );
    assert_eq!(c.outbox_path, dir.path().join("state/outbox.redb"));
    assert_eq!(
        c.gateways,
        vec!["ws://127.0.0.1:8081/ws", "wss://gw2.example/ws"]
    );
    assert_eq!(c.labels.len(), 2);
    assert_eq!(c.labels["region"], "eu-central");
    assert_eq!(c.report_period, Duration::from_secs(15));
    assert_eq!(c.heartbeat, Some(Duration::from_secs(10)));
    assert_eq!(c.backoff.base(), Duration::from_millis(200));
    assert_eq!(c.backoff.cap(), Duration::from_secs(10));
    assert!((c.backoff.jitter() - 0.5).abs() < f64::EPSILON);
    assert_eq!(c.allowed_commands, vec!["/usr/bin/uptime", "df"]);
    assert_eq!(c.file.as_deref(), Some(path.as_path()));
    // The token never shows up in Debug output.
    let debug = format!("{c:?}");
    assert!(!debug.contains("tok-from-file"), "{debug}");
}

#[test]
fn minimal_file_gets_defaults() {
    let c = load(MINIMAL, no_env).unwrap();
    assert_eq!(c.token.expose(), "secret");
    assert_eq!(c.token_file, None);
    assert_eq!(c.report_period, Duration::from_secs(30));
    assert_eq!(c.heartbeat, None);
    assert_eq!(c.backoff, agent::ExponentialBackoff::default());
    assert!(c.labels.is_empty());
    assert!(
        c.allowed_commands.is_empty(),
        "no command allowed by default"
    );
    assert_eq!(c.outbox_path, Path::new("/var/lib/agent/outbox.redb"));
    assert_eq!(c.metrics_listen, None, "no metrics endpoint by default");
}

#[test]
fn environment_overrides_the_file() {
    let e = env(&[
        ("AGENT_NODE_ID", "from-env"),
        ("AGENT_TOKEN", " env-token "),
        ("AGENT_GATEWAYS", "ws://a:1/ws, ws://b:2/ws"),
        ("AGENT_LABELS", "zone=z1,tier=edge"),
        ("AGENT_OUTBOX_PATH", "rel/outbox.redb"),
        ("AGENT_HEARTBEAT_SECS", "5"),
        ("AGENT_REPORT_PERIOD_SECS", "60"),
        ("AGENT_BACKOFF_BASE_MS", "50"),
        ("AGENT_BACKOFF_CAP_MS", "5000"),
        ("AGENT_BACKOFF_JITTER", "0"),
        ("AGENT_ALLOWED_COMMANDS", "ls,/bin/true"),
    ]);
    let c = load(GOOD, e).unwrap();
    assert_eq!(c.node_id.as_str(), "from-env");
    // An inline token from the environment replaces the file's token_file.
    assert_eq!(c.token.expose(), "env-token");
    assert_eq!(c.token_file, None);
    assert_eq!(c.gateways, vec!["ws://a:1/ws", "ws://b:2/ws"]);
    assert_eq!(
        c.labels.iter().collect::<Vec<_>>(),
        vec![
            (&"tier".to_owned(), &"edge".to_owned()),
            (&"zone".to_owned(), &"z1".to_owned())
        ]
    );
    // Relative paths from the environment are used as given.
    assert_eq!(c.outbox_path, Path::new("rel/outbox.redb"));
    assert_eq!(c.heartbeat, Some(Duration::from_secs(5)));
    assert_eq!(c.report_period, Duration::from_secs(60));
    assert_eq!(c.backoff.base(), Duration::from_millis(50));
    assert_eq!(c.backoff.cap(), Duration::from_secs(5));
    assert_eq!(c.backoff.jitter(), 0.0);
    assert_eq!(c.allowed_commands, vec!["ls", "/bin/true"]);
}

#[test]
fn environment_alone_is_enough() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("tok");
    std::fs::write(&token, "t0k\n").unwrap();
    let e = env(&[
        ("AGENT_NODE_ID", "n1"),
        ("AGENT_TOKEN_FILE", token.to_str().unwrap()),
        ("AGENT_GATEWAYS", "ws://127.0.0.1:8081/ws"),
        ("AGENT_OUTBOX_PATH", "/tmp/x.redb"),
    ]);
    let c = AgentConfig::load(None, e).unwrap();
    assert_eq!(c.token.expose(), "t0k");
    assert_eq!(c.token_file, Some(token));
    assert_eq!(c.file, None);
}

/// Asserts `err` is about `field`, from `origin`, and returns its problem.
fn invalid(err: ConfigError, field: &str, origin: &Origin) -> Problem {
    let msg = err.to_string();
    match err {
        ConfigError::Invalid {
            field: f,
            origin: o,
            problem,
        } => {
            assert_eq!(f, field, "{msg}");
            assert_eq!(&o, origin, "{msg}");
            assert!(msg.contains(field), "message names the field: {msg}");
            problem
        }
        other => panic!("expected an invalid {field}, got {other:?}"),
    }
}

#[test]
fn bad_toml_reports_the_file_and_line() {
    let (_dir, path) = write_config("node_id = \"n1\"\ngateways = [\"ws://a\"\ntoken = 1\n");
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let msg = err.to_string();
    let ConfigError::Parse { path: p, line, .. } = err else {
        panic!("expected a parse error, got {err:?}");
    };
    assert_eq!(p, path);
    assert_eq!(line, Some(3), "{msg}");
    assert!(msg.contains("agent.toml"), "{msg}");
    assert!(msg.contains("line 3"), "{msg}");
}

#[test]
fn wrong_type_and_unknown_key_are_parse_errors_with_lines() {
    let text = format!("{MINIMAL}report_period_secs = \"soon\"\n");
    let err = load(&text, no_env).unwrap_err();
    assert!(
        matches!(err, ConfigError::Parse { line: Some(6), .. }),
        "{err:?}"
    );

    let text = format!("{MINIMAL}gateway = \"ws://typo\"\n");
    let err = load(&text, no_env).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ConfigError::Parse { line: Some(6), .. }),
        "{err:?}"
    );
    assert!(msg.contains("gateway"), "{msg}");

    let text = format!("{MINIMAL}[backoff]\nbase = 5\n");
    let err = load(&text, no_env).unwrap_err();
    assert!(
        matches!(err, ConfigError::Parse { line: Some(7), .. }),
        "{err:?}"
    );
}

#[test]
fn unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.toml");
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    assert!(err.to_string().contains("missing.toml"), "{err}");
    assert!(matches!(err, ConfigError::Read { .. }));
}

#[test]
fn missing_required_fields_name_the_field_the_file_and_the_variable() {
    for (field, var) in [
        ("node_id", "AGENT_NODE_ID"),
        ("token", "AGENT_TOKEN"),
        ("gateways", "AGENT_GATEWAYS"),
        ("outbox_path", "AGENT_OUTBOX_PATH"),
    ] {
        let text: String = MINIMAL
            .lines()
            .filter(|l| !l.starts_with(field))
            .map(|l| format!("{l}\n"))
            .collect();
        let (_dir, path) = write_config(&text);
        let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(&err, ConfigError::Missing { field: f, env, file: Some(p) }
                if *f == field && *env == var && *p == path),
            "{err:?}"
        );
        assert_eq!(err.field(), Some(field));
        assert!(msg.contains(field) && msg.contains(var), "{msg}");
        assert!(msg.contains("agent.toml"), "{msg}");
    }
}

#[test]
fn invalid_node_id() {
    let text = MINIMAL.replace("\"n1\"", "\"bad id.with*\"");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "node_id", &Origin::File(path));
    assert!(matches!(p, Problem::NodeId(_)), "{p:?}");

    let err = load(MINIMAL, env(&[("AGENT_NODE_ID", "")])).unwrap_err();
    let p = invalid(err, "node_id", &Origin::Env("AGENT_NODE_ID"));
    assert!(matches!(p, Problem::NodeId(messages::IdError::Empty)));
}

#[test]
fn gateway_errors() {
    let text = MINIMAL.replace("[\"ws://127.0.0.1:8081/ws\"]", "[]");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let origin = Origin::File(path);
    assert!(matches!(
        invalid(err, "gateways", &origin),
        Problem::NoGateways
    ));

    let err = load(MINIMAL, env(&[("AGENT_GATEWAYS", " , ")])).unwrap_err();
    let p = invalid(err, "gateways", &Origin::Env("AGENT_GATEWAYS"));
    assert!(matches!(p, Problem::NoGateways));

    let err = load(MINIMAL, env(&[("AGENT_GATEWAYS", "http://gw:80/ws")])).unwrap_err();
    let msg = err.to_string();
    let p = invalid(err, "gateways", &Origin::Env("AGENT_GATEWAYS"));
    assert!(
        matches!(&p, Problem::GatewayScheme { url } if url == "http://gw:80/ws"),
        "{p:?}"
    );
    assert!(msg.contains("ws://"), "{msg}");

    let err = load(MINIMAL, env(&[("AGENT_GATEWAYS", "ws://gw:notaport/ws")])).unwrap_err();
    let p = invalid(err, "gateways", &Origin::Env("AGENT_GATEWAYS"));
    assert!(matches!(p, Problem::GatewayUrl { .. }), "{p:?}");
}

#[test]
fn token_errors() {
    // Both in the file.
    let text = format!("{MINIMAL}token_file = \"token\"\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    assert!(matches!(
        invalid(err, "token", &Origin::File(path.clone())),
        Problem::TokenAndTokenFile
    ));

    // Both in the environment.
    let err = load(
        MINIMAL,
        env(&[("AGENT_TOKEN", "a"), ("AGENT_TOKEN_FILE", "/x")]),
    )
    .unwrap_err();
    assert!(matches!(
        invalid(err, "token", &Origin::Env("AGENT_TOKEN")),
        Problem::TokenAndTokenFile
    ));

    // Empty inline token.
    let err = load(MINIMAL, env(&[("AGENT_TOKEN", "  ")])).unwrap_err();
    assert!(matches!(
        invalid(err, "token", &Origin::Env("AGENT_TOKEN")),
        Problem::EmptyToken
    ));

    // Whitespace inside.
    let err = load(MINIMAL, env(&[("AGENT_TOKEN", "ab cd")])).unwrap_err();
    assert!(matches!(
        invalid(err, "token", &Origin::Env("AGENT_TOKEN")),
        Problem::TokenCharacters
    ));

    // Unreadable token file: the error names the resolved path.
    let text = MINIMAL.replace("token = \"secret\"", "token_file = \"nope\"");
    let (dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let msg = err.to_string();
    let p = invalid(err, "token_file", &Origin::File(path));
    assert!(
        matches!(&p, Problem::TokenFile { path, .. } if *path == dir.path().join("nope")),
        "{p:?}"
    );
    assert!(msg.contains("nope"), "{msg}");

    // Empty token file.
    let text = MINIMAL.replace("token = \"secret\"", "token_file = \"empty\"");
    let (dir, path) = write_config(&text);
    std::fs::write(dir.path().join("empty"), "\n").unwrap();
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    assert!(matches!(
        invalid(err, "token_file", &Origin::File(path)),
        Problem::EmptyToken
    ));
}

#[test]
fn number_errors() {
    let err = load(MINIMAL, env(&[("AGENT_REPORT_PERIOD_SECS", "soon")])).unwrap_err();
    let p = invalid(
        err,
        "report_period_secs",
        &Origin::Env("AGENT_REPORT_PERIOD_SECS"),
    );
    assert!(matches!(&p, Problem::NotAnInteger { value } if value == "soon"));

    let err = load(MINIMAL, env(&[("AGENT_REPORT_PERIOD_SECS", "-1")])).unwrap_err();
    let p = invalid(
        err,
        "report_period_secs",
        &Origin::Env("AGENT_REPORT_PERIOD_SECS"),
    );
    assert!(matches!(p, Problem::NotAnInteger { .. }));

    let text = format!("{MINIMAL}report_period_secs = 0\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "report_period_secs", &Origin::File(path));
    assert!(matches!(p, Problem::Zero));

    let err = load(MINIMAL, env(&[("AGENT_HEARTBEAT_SECS", "0")])).unwrap_err();
    let p = invalid(err, "heartbeat_secs", &Origin::Env("AGENT_HEARTBEAT_SECS"));
    assert!(matches!(p, Problem::Zero));

    let err = load(MINIMAL, env(&[("AGENT_BACKOFF_JITTER", "lots")])).unwrap_err();
    let p = invalid(err, "backoff.jitter", &Origin::Env("AGENT_BACKOFF_JITTER"));
    assert!(matches!(p, Problem::NotANumber { .. }));
}

#[test]
fn backoff_errors_name_the_setting() {
    let text = format!("{MINIMAL}[backoff]\njitter = 1.5\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let msg = err.to_string();
    let p = invalid(err, "backoff.jitter", &Origin::File(path.clone()));
    assert!(matches!(p, Problem::Backoff(BackoffError::Jitter(_))));
    assert!(msg.contains("agent.toml"), "{msg}");

    let err = load(MINIMAL, env(&[("AGENT_BACKOFF_BASE_MS", "0")])).unwrap_err();
    let p = invalid(
        err,
        "backoff.base_ms",
        &Origin::Env("AGENT_BACKOFF_BASE_MS"),
    );
    assert!(matches!(p, Problem::Backoff(BackoffError::ZeroBase)));

    // A base above the default cap is reported on the base, which is what was set.
    let err = load(MINIMAL, env(&[("AGENT_BACKOFF_BASE_MS", "60000")])).unwrap_err();
    let p = invalid(
        err,
        "backoff.base_ms",
        &Origin::Env("AGENT_BACKOFF_BASE_MS"),
    );
    assert!(matches!(
        p,
        Problem::Backoff(BackoffError::BaseAboveCap { .. })
    ));

    // A cap below the default base is reported on the cap.
    let text = format!("{MINIMAL}[backoff]\ncap_ms = 10\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "backoff.cap_ms", &Origin::File(path));
    assert!(matches!(
        p,
        Problem::Backoff(BackoffError::BaseAboveCap { .. })
    ));
}

#[test]
fn label_and_command_errors() {
    let text = format!("{MINIMAL}[labels]\n\"bad key\" = \"v\"\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "labels", &Origin::File(path));
    assert!(matches!(&p, Problem::Label { label, .. } if label == "bad key"));

    let err = load(MINIMAL, env(&[("AGENT_LABELS", "novalue")])).unwrap_err();
    let p = invalid(err, "labels", &Origin::Env("AGENT_LABELS"));
    assert!(matches!(p, Problem::Label { .. }));

    let err = load(MINIMAL, env(&[("AGENT_LABELS", "a=b,c=d,e")])).unwrap_err();
    let p = invalid(err, "labels", &Origin::Env("AGENT_LABELS"));
    assert!(matches!(&p, Problem::Label { label, .. } if label == "e"));

    let text = format!("{MINIMAL}allowed_commands = [\"bin/run\"]\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "allowed_commands", &Origin::File(path));
    assert!(matches!(&p, Problem::Command { entry, .. } if entry == "bin/run"));

    let text = format!("{MINIMAL}allowed_commands = [\"\"]\n");
    let err = load(&text, no_env).unwrap_err();
    assert_eq!(err.field(), Some("allowed_commands"));
}

#[test]
fn empty_outbox_path() {
    let err = load(MINIMAL, env(&[("AGENT_OUTBOX_PATH", "")])).unwrap_err();
    let p = invalid(err, "outbox_path", &Origin::Env("AGENT_OUTBOX_PATH"));
    assert!(matches!(p, Problem::EmptyPath));
}

#[test]
fn metrics_listen_from_the_file_or_the_environment() {
    let text = format!("{MINIMAL}metrics_listen = \"127.0.0.1:9464\"\n");
    let c = load(&text, no_env).unwrap();
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));

    // The environment wins, IPv6 works, and surrounding whitespace is ignored.
    let c = load(&text, env(&[("AGENT_METRICS_LISTEN", " [::1]:9100 ")])).unwrap();
    assert_eq!(c.metrics_listen, Some("[::1]:9100".parse().unwrap()));

    // Port 0 asks for a free port.
    let c = load(MINIMAL, env(&[("AGENT_METRICS_LISTEN", "0.0.0.0:0")])).unwrap();
    assert_eq!(c.metrics_listen, Some("0.0.0.0:0".parse().unwrap()));

    // An empty value turns off the file's endpoint.
    let c = load(&text, env(&[("AGENT_METRICS_LISTEN", "")])).unwrap();
    assert_eq!(c.metrics_listen, None);
}

#[test]
fn metrics_listen_errors_name_the_setting_and_the_value() {
    for bad in [
        "9464",
        "localhost:9464",
        "127.0.0.1",
        "127.0.0.1:99999",
        "::1:9464",
        "x",
    ] {
        let err = load(MINIMAL, env(&[("AGENT_METRICS_LISTEN", bad)])).unwrap_err();
        let msg = err.to_string();
        let p = invalid(err, "metrics_listen", &Origin::Env("AGENT_METRICS_LISTEN"));
        assert!(
            matches!(&p, Problem::NotASocketAddr { value } if value == bad),
            "{bad}: {p:?}"
        );
        assert!(msg.contains("AGENT_METRICS_LISTEN"), "{msg}");
        assert!(msg.contains("IP:port"), "{msg}");
    }

    let text = format!("{MINIMAL}metrics_listen = \"127.0.0.1:port\"\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "metrics_listen", &Origin::File(path));
    assert!(matches!(p, Problem::NotASocketAddr { .. }));

    // A number where an address belongs is a type error with a line, like any other.
    let text = format!("{MINIMAL}metrics_listen = 9464\n");
    let err = load(&text, no_env).unwrap_err();
    assert!(
        matches!(err, ConfigError::Parse { line: Some(6), .. }),
        "{err:?}"
    );
}

// ---- execution policy -------------------------------------------------------------------

#[test]
fn execution_policy_defaults() {
    let c = load(MINIMAL, no_env).unwrap();
    assert_eq!(
        c.command_search_path,
        [
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin"
        ]
        .map(PathBuf::from)
    );
    assert!(c.allowed_env.is_empty(), "no task env by default");
    assert!(c.allowed_cwd_roots.is_empty(), "no task cwd by default");
    assert_eq!(c.max_concurrent_tasks, 16);
    assert_eq!(c.max_timeout, Duration::from_secs(3600));
    assert!(c.probe_allow.is_empty() && c.probe_deny.is_empty());
    assert_eq!(c.exec_policy(), agent::ExecPolicy::default());
}

const POLICY: &str = r#"
command_search_path = ["/opt/tools/bin", "/usr/bin"]
allowed_env = ["TZ", "MY_SETTING"]
allowed_cwd_roots = ["/srv/jobs", "/tmp"]
max_concurrent_tasks = 4
max_timeout_ms = 600000
probe_allow = ["169.254.169.254/32"]
probe_deny = ["10.0.0.0/8", "fd00::/8"]
"#;

#[test]
fn execution_policy_from_the_file_and_the_environment() {
    let text = format!("{MINIMAL}{POLICY}");
    let c = load(&text, no_env).unwrap();
    assert_eq!(
        c.command_search_path,
        [PathBuf::from("/opt/tools/bin"), PathBuf::from("/usr/bin")]
    );
    assert_eq!(c.allowed_env, ["TZ", "MY_SETTING"]);
    assert_eq!(
        c.allowed_cwd_roots,
        [PathBuf::from("/srv/jobs"), PathBuf::from("/tmp")]
    );
    assert_eq!(c.max_concurrent_tasks, 4);
    assert_eq!(c.max_timeout, Duration::from_secs(600));
    assert_eq!(c.probe_allow, ["169.254.169.254/32".parse().unwrap()]);
    assert_eq!(
        c.probe_deny,
        [
            "10.0.0.0/8".parse::<agent::Cidr>().unwrap(),
            "fd00::/8".parse().unwrap()
        ]
    );
    let policy = c.exec_policy();
    assert_eq!(policy.path_var(), "/opt/tools/bin:/usr/bin");
    assert_eq!(policy.max_concurrent_tasks, 4);

    // Each variable replaces the file's value; the search path takes `:` like PATH.
    let e = env(&[
        ("AGENT_COMMAND_SEARCH_PATH", "/a/bin:/b/bin"),
        ("AGENT_ALLOWED_ENV", "LANG"),
        ("AGENT_ALLOWED_CWD_ROOTS", "/data"),
        ("AGENT_MAX_CONCURRENT_TASKS", "1"),
        ("AGENT_MAX_TIMEOUT_MS", "1000"),
        ("AGENT_PROBE_ALLOW", ""),
        ("AGENT_PROBE_DENY", "192.168.0.0/16, ::1"),
    ]);
    let c = load(&text, e).unwrap();
    assert_eq!(
        c.command_search_path,
        [PathBuf::from("/a/bin"), PathBuf::from("/b/bin")]
    );
    assert_eq!(c.allowed_env, ["LANG"]);
    assert_eq!(c.allowed_cwd_roots, [PathBuf::from("/data")]);
    assert_eq!(c.max_concurrent_tasks, 1);
    assert_eq!(c.max_timeout, Duration::from_secs(1));
    assert!(
        c.probe_allow.is_empty(),
        "an empty variable clears the list"
    );
    assert_eq!(
        c.probe_deny,
        [
            "192.168.0.0/16".parse::<agent::Cidr>().unwrap(),
            "::1/128".parse().unwrap()
        ]
    );
    let c = load(MINIMAL, env(&[("AGENT_COMMAND_SEARCH_PATH", "/x,/y")])).unwrap();
    assert_eq!(c.command_search_path.len(), 2);
}

#[test]
fn loader_and_shell_variables_cannot_be_allowed() {
    for name in [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PATH",
        "DYLD_INSERT_LIBRARIES",
        "BASH_ENV",
    ] {
        let text = format!("{MINIMAL}allowed_env = [\"TZ\", \"{name}\"]\n");
        let (_dir, path) = write_config(&text);
        let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
        let msg = err.to_string();
        let p = invalid(err, "allowed_env", &Origin::File(path));
        assert!(
            matches!(&p, Problem::EnvName { name: n, .. } if n == name),
            "{p:?}"
        );
        assert!(msg.contains("may never be set"), "{msg}");

        let err = load(MINIMAL, env(&[("AGENT_ALLOWED_ENV", name)])).unwrap_err();
        invalid(err, "allowed_env", &Origin::Env("AGENT_ALLOWED_ENV"));
    }
    let err = load(MINIMAL, env(&[("AGENT_ALLOWED_ENV", "A-B")])).unwrap_err();
    let p = invalid(err, "allowed_env", &Origin::Env("AGENT_ALLOWED_ENV"));
    assert!(matches!(p, Problem::EnvName { .. }));
}

#[test]
fn execution_policy_errors_name_the_setting() {
    let cases: [(&str, &str, &str); 10] = [
        ("command_search_path", "AGENT_COMMAND_SEARCH_PATH", "bin"),
        ("command_search_path", "AGENT_COMMAND_SEARCH_PATH", ""),
        ("allowed_cwd_roots", "AGENT_ALLOWED_CWD_ROOTS", "srv/jobs"),
        ("max_concurrent_tasks", "AGENT_MAX_CONCURRENT_TASKS", "0"),
        ("max_concurrent_tasks", "AGENT_MAX_CONCURRENT_TASKS", "many"),
        ("max_timeout_ms", "AGENT_MAX_TIMEOUT_MS", "0"),
        ("probe_allow", "AGENT_PROBE_ALLOW", "169.254.169.254/33"),
        ("probe_allow", "AGENT_PROBE_ALLOW", "metadata"),
        ("probe_deny", "AGENT_PROBE_DENY", "10.0.0.1/8"),
        ("probe_deny", "AGENT_PROBE_DENY", "10.0.0.0/8,x"),
    ];
    for (field, var, value) in cases {
        let err = load(MINIMAL, env(&[(var, value)])).unwrap_err();
        let msg = err.to_string();
        invalid(err, field, &Origin::Env(var));
        assert!(msg.contains(var), "{msg}");
    }
    // A host address where a network belongs is probably a typo: the error suggests one.
    let err = load(MINIMAL, env(&[("AGENT_PROBE_DENY", "10.0.0.1/8")])).unwrap_err();
    assert!(err.to_string().contains("10.0.0.0/8"), "{err}");

    let text = format!("{MINIMAL}command_search_path = [\"/usr/bin\", \"tools\"]\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "command_search_path", &Origin::File(path));
    assert!(matches!(&p, Problem::Directory { entry, .. } if entry == "tools"));

    let text = format!("{MINIMAL}command_search_path = []\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "command_search_path", &Origin::File(path));
    assert!(matches!(p, Problem::EmptySearchPath));

    let text = format!("{MINIMAL}probe_deny = [\"10.0.0.0/8\", \"nope\"]\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "probe_deny", &Origin::File(path));
    assert!(matches!(p, Problem::Cidr(_)));

    let text = format!("{MINIMAL}max_timeout_ms = 0\n");
    let (_dir, path) = write_config(&text);
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    let p = invalid(err, "max_timeout_ms", &Origin::File(path));
    assert!(matches!(p, Problem::Zero));
}

#[test]
fn config_documents_go_to_config_dir_and_their_state_beside_the_outbox() {
    let c = load(MINIMAL, no_env).unwrap();
    assert_eq!(c.config_dir, None, "no config documents unless configured");
    assert_eq!(
        c.config_state_path,
        Path::new("/var/lib/agent/configs.json")
    );
    let (dir, path) = write_config(&format!(
        "{MINIMAL}config_dir = \"etc\"\nconfig_state_path = \"state/applied.json\"\n"
    ));
    let c = AgentConfig::load(Some(&path), no_env).unwrap();
    assert_eq!(c.config_dir, Some(dir.path().join("etc")));
    assert_eq!(c.config_state_path, dir.path().join("state/applied.json"));
    // The environment wins; an empty AGENT_CONFIG_DIR turns the file's setting off.
    let c = AgentConfig::load(Some(&path), env(&[("AGENT_CONFIG_DIR", "/srv/etc")])).unwrap();
    assert_eq!(c.config_dir.as_deref(), Some(Path::new("/srv/etc")));
    let c = AgentConfig::load(Some(&path), env(&[("AGENT_CONFIG_DIR", "")])).unwrap();
    assert_eq!(c.config_dir, None);
    let e = AgentConfig::load(Some(&path), env(&[("AGENT_CONFIG_STATE_PATH", "")])).unwrap_err();
    assert_eq!(e.field(), Some("config_state_path"));
}

#[test]
fn upgrade_settings_come_from_the_file_or_the_environment() {
    let c = load(MINIMAL, no_env).unwrap();
    assert_eq!(c.scheduler_url, None);
    assert_eq!(c.reported_version, env!("CARGO_PKG_VERSION"));
    assert!(!c.upgrade_probe);
    assert_eq!(
        c.upgrade_state_path,
        Path::new("/var/lib/agent/upgrade.json")
    );
    let with_url = format!("scheduler_url = \"https://sched.example:8100/\"\n{MINIMAL}");
    let c = load(&with_url, no_env).unwrap();
    assert_eq!(
        c.scheduler_url.as_deref(),
        Some("https://sched.example:8100")
    );
    let c = load(
        &with_url,
        env(&[
            ("AGENT_SCHEDULER_URL", ""),
            ("AGENT_REPORTED_VERSION", "1.2.3+build7"),
            ("AGENT_UPGRADE_PROBE", "1"),
        ]),
    )
    .unwrap();
    assert_eq!(c.scheduler_url, None);
    assert_eq!(c.reported_version, "1.2.3+build7");
    assert!(c.upgrade_probe);
    let err = load(MINIMAL, env(&[("AGENT_SCHEDULER_URL", "ftp://sched")])).unwrap_err();
    assert_eq!(err.field(), Some("scheduler_url"));
    assert!(matches!(
        err,
        ConfigError::Invalid {
            problem: Problem::SchedulerUrl { .. },
            ..
        }
    ));
}

/// A relay on a `ws://` path could read the agent's token and alter its traffic: such a
/// `via=` is refused unless `insecure_relay` says this is a test setup; over `wss://` the
/// relay sees only ciphertext and it is always accepted.
#[test]
fn a_plaintext_relay_must_be_allowed_explicitly() {
    let plain = "ws://gw.example:8081/ws?via=10.0.0.5:7000";
    let err = load(MINIMAL, env(&[("AGENT_GATEWAYS", plain)])).unwrap_err();
    let msg = err.to_string();
    let p = invalid(err, "gateways", &Origin::Env("AGENT_GATEWAYS"));
    assert!(
        matches!(&p, Problem::GatewayUrl { url, .. } if url == plain),
        "{p:?}"
    );
    assert!(msg.contains("wss://"), "{msg}");

    let c = load(
        MINIMAL,
        env(&[("AGENT_GATEWAYS", plain), ("AGENT_INSECURE_RELAY", "1")]),
    )
    .unwrap();
    assert!(c.insecure_relay);
    let text = format!(
        "insecure_relay = true\n{}",
        MINIMAL.replace("ws://127.0.0.1:8081/ws", plain)
    );
    let c = load(&text, no_env).unwrap();
    assert!(c.insecure_relay);

    let tls = "wss://gw.example/ws?via=10.0.0.5:7000";
    let c = load(MINIMAL, env(&[("AGENT_GATEWAYS", tls)])).unwrap();
    assert!(!c.insecure_relay);
    assert_eq!(c.gateways, [tls]);

    let err = load(
        MINIMAL,
        env(&[("AGENT_GATEWAYS", plain), ("AGENT_INSECURE_RELAY", "maybe")]),
    )
    .unwrap_err();
    assert!(matches!(
        invalid(err, "insecure_relay", &Origin::Env("AGENT_INSECURE_RELAY")),
        Problem::NotABool { .. }
    ));
}

/// A relay may listen on a unix socket file (`unix:/absolute/path`) as well as on
/// `IP:port`, from the file or the environment; anything else is refused naming
/// `relay_listen` and where the value came from.
#[test]
fn relay_listen_takes_a_unix_socket_path() {
    let text = format!("relay_listen = \"unix:/run/edge/relay.sock\"\n{MINIMAL}");
    let c = load(&text, no_env).unwrap();
    assert_eq!(
        c.relay_listen,
        Some(RelayListen::Unix("/run/edge/relay.sock".into()))
    );
    let c = load(
        &text,
        env(&[("AGENT_RELAY_LISTEN", "unix:/tmp/other.sock")]),
    )
    .unwrap();
    assert_eq!(
        c.relay_listen,
        Some(RelayListen::Unix("/tmp/other.sock".into()))
    );
    let c = load(&text, env(&[("AGENT_RELAY_LISTEN", "127.0.0.1:7000")])).unwrap();
    assert_eq!(
        c.relay_listen,
        Some(RelayListen::Tcp(([127, 0, 0, 1], 7000).into()))
    );

    for bad in [
        "unix:relay.sock",
        "unix:",
        "unix://run/relay.sock",
        "/run/relay.sock",
    ] {
        let err = load(MINIMAL, env(&[("AGENT_RELAY_LISTEN", bad)])).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                invalid(err, "relay_listen", &Origin::Env("AGENT_RELAY_LISTEN")),
                Problem::RelayListen { .. }
            ),
            "{bad}"
        );
        assert!(msg.contains("unix:/absolute/path"), "{msg}");
    }
    let (_dir, path) = write_config(&format!("relay_listen = \"unix:rel.sock\"\n{MINIMAL}"));
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    assert!(matches!(
        invalid(err, "relay_listen", &Origin::File(path)),
        Problem::RelayListen { .. }
    ));
}

/// `via=unix:/path` reaches a relay's socket file; a relative, empty, malformed or
/// doubled `via=` is a configuration error naming `gateways`, and the `ws://` rule and the
/// one-level rule apply to it as to `via=host:port`.
#[test]
fn via_unix_in_a_gateway_url_is_checked_like_via_host_port() {
    let tls = "wss://gw.example/ws?via=unix:/run/edge/relay.sock";
    let c = load(MINIMAL, env(&[("AGENT_GATEWAYS", tls)])).unwrap();
    assert_eq!(c.gateways, [tls]);
    let encoded = "wss://gw.example/ws?via=unix%3A%2Frun%2Fedge%2Frelay.sock";
    load(MINIMAL, env(&[("AGENT_GATEWAYS", encoded)])).unwrap();

    for bad in [
        "wss://gw.example/ws?via=unix:relay.sock",
        "wss://gw.example/ws?via=unix:",
        "wss://gw.example/ws?via=",
        "wss://gw.example/ws?via=unix://run/relay.sock",
        "wss://gw.example/ws?via=unix:/run/relay%zz.sock",
        "wss://gw.example/ws?via=10.0.0.5:7000&via=unix:/run/relay.sock",
    ] {
        let err = load(MINIMAL, env(&[("AGENT_GATEWAYS", bad)])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("gateways") && msg.contains("via="), "{msg}");
        let p = invalid(err, "gateways", &Origin::Env("AGENT_GATEWAYS"));
        assert!(
            matches!(&p, Problem::GatewayUrl { url, .. } if url == bad),
            "{bad}: {p:?}"
        );
    }
    // The same from the file.
    let (_dir, path) = write_config(&MINIMAL.replace(
        "ws://127.0.0.1:8081/ws",
        "wss://gw.example/ws?via=unix:relay.sock",
    ));
    let err = AgentConfig::load(Some(&path), no_env).unwrap_err();
    assert!(matches!(
        invalid(err, "gateways", &Origin::File(path)),
        Problem::GatewayUrl { .. }
    ));

    // Over ws:// the relay could read the token, socket file or not.
    let plain = "ws://gw.example/ws?via=unix:/run/edge/relay.sock";
    let err = load(MINIMAL, env(&[("AGENT_GATEWAYS", plain)])).unwrap_err();
    assert!(err.to_string().contains("wss://"), "{err}");
    load(
        MINIMAL,
        env(&[("AGENT_GATEWAYS", plain), ("AGENT_INSECURE_RELAY", "1")]),
    )
    .unwrap();

    // A relay's own gateways are reached directly.
    let err = load(
        MINIMAL,
        env(&[
            ("AGENT_GATEWAYS", tls),
            ("AGENT_RELAY_LISTEN", "unix:/run/edge/relay.sock"),
        ]),
    )
    .unwrap_err();
    assert_eq!(err.field(), Some("gateways"));
}
