//! A real browser for tests: Debian's `chromium` driven through `chromedriver` over the
//! W3C WebDriver protocol (plain JSON over HTTP with the workspace's one HTTP client, so no
//! WebDriver crate is needed for the handful of commands tests use), and a tiny static
//! file server to load pages and the JavaScript client library from.
//!
//! [`Browser::start`] returns `None` only when chromium or chromedriver is not installed,
//! so a test can skip with a message on a developer machine; `.ci/run` installs both, so CI
//! never skips. The browser runs headless (`--headless=new`) with `--no-sandbox` (CI runs as
//! root, where Chrome's sandbox refuses to start) and a throw-away profile. chromedriver is
//! started in a process group of its own and the whole group is killed on drop, so a
//! failing test leaves no browser behind.

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How long chromedriver may take to answer `/status` after it was started.
const DRIVER_START: Duration = Duration::from_secs(20);
/// Bound on one WebDriver command (a new session starts Chromium: a few seconds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(45);

/// Why the browser could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BrowserError {
    /// Spawning or talking to chromedriver failed.
    #[error("webdriver I/O: {0}")]
    Io(String),
    /// chromedriver answered a command with a WebDriver error.
    #[error("webdriver error {status}: {error}: {message}")]
    WebDriver {
        /// HTTP status.
        status: u16,
        /// The WebDriver error code (`javascript error`, `script timeout`, ...).
        error: String,
        /// Its message.
        message: String,
    },
}

/// The two programs a browser test needs, or `None` when either is missing.
/// `CHROMIUM_BIN` and `CHROMEDRIVER_BIN` override the search.
pub fn binaries() -> Option<(PathBuf, PathBuf)> {
    // Debian's /usr/bin/chromium is a shell wrapper; the real binary behaves the same
    // without the wrapper's environment probing.
    let chromium = env_path("CHROMIUM_BIN")
        .or_else(|| Some(PathBuf::from("/usr/lib/chromium/chromium")).filter(|p| p.is_file()))
        .or_else(|| on_path(&["chromium", "chromium-browser", "google-chrome"]))?;
    let driver = env_path("CHROMEDRIVER_BIN").or_else(|| on_path(&["chromedriver"]))?;
    Some((chromium, driver))
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

fn on_path(names: &[&str]) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    names.iter().find_map(|name| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A headless Chromium session behind its own chromedriver.
#[derive(Debug)]
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    /// The Chromium profile; removed on drop.
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless session. `Ok(None)` when
    /// chromium or chromedriver is not installed (the caller skips, saying why).
    pub async fn start() -> Result<Option<Browser>, BrowserError> {
        let Some((chromium, driver_bin)) = binaries() else {
            return Ok(None);
        };
        let io = |e: &dyn std::fmt::Display| BrowserError::Io(e.to_string());
        let port = crate::process::free_addr().port();
        let log = std::env::temp_dir().join(format!("chromedriver-{port}.log"));
        let mut command = Command::new(&driver_bin);
        command
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: chromedriver and the browsers it starts die together.
            .process_group(0);
        let driver = command.spawn().map_err(|e| io(&e))?;
        let http = servicekit::http_client::client(servicekit::http_client::ClientOptions {
            timeout: Some(COMMAND_TIMEOUT),
            ..Default::default()
        })
        .map_err(|e| io(&e))?;
        let profile = tempfile::Builder::new()
            .prefix("chromium-test-")
            .tempdir()
            .map_err(|e| io(&e))?;
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            http,
            profile,
        };
        browser.wait_ready().await?;
        let args = [
            "--headless=new".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--no-first-run".to_owned(),
            "--window-size=1024,768".to_owned(),
            format!("--user-data-dir={}", browser.profile.path().display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "timeouts": {"script": 30_000, "pageLoad": 30_000},
        }}});
        let value = browser.command("POST", "/session", caps).await?;
        browser.session = value["sessionId"].as_str().unwrap_or_default().to_owned();
        if browser.session.is_empty() {
            return Err(BrowserError::Io(format!("no session id in {value}")));
        }
        Ok(Some(browser))
    }

    async fn wait_ready(&mut self) -> Result<(), BrowserError> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.driver.try_wait() {
                return Err(BrowserError::Io(format!(
                    "chromedriver exited at start: {status}"
                )));
            }
            if let Ok(status) = self.command("GET", "/status", Value::Null).await
                && status["ready"] == true
            {
                return Ok(());
            }
            if started.elapsed() > DRIVER_START {
                return Err(BrowserError::Io(format!(
                    "chromedriver not ready after {DRIVER_START:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One WebDriver command; returns its `value`.
    async fn command(&self, method: &str, path: &str, body: Value) -> Result<Value, BrowserError> {
        let io = |e: &dyn std::fmt::Display| BrowserError::Io(e.to_string());
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| io(&e))?;
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if !body.is_null() {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let resp = req.send().await.map_err(|e| io(&e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| io(&e))?;
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| io(&e))?;
        let value = v.get("value").cloned().unwrap_or(Value::Null);
        if status >= 400 {
            return Err(BrowserError::WebDriver {
                status,
                error: value["error"].as_str().unwrap_or_default().to_owned(),
                message: value["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) -> Result<(), BrowserError> {
        self.command("POST", &self.session_path("/url"), json!({ "url": url }))
            .await
            .map(|_| ())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns what it returns.
    pub async fn execute(&self, script: &str, args: Value) -> Result<Value, BrowserError> {
        self.command(
            "POST",
            &self.session_path("/execute/sync"),
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Runs `script` asynchronously: it finishes by calling the last element of `arguments`
    /// (the callback) with the result. Times out after 30 s (the session's script timeout).
    pub async fn execute_async(&self, script: &str, args: Value) -> Result<Value, BrowserError> {
        self.command(
            "POST",
            &self.session_path("/execute/async"),
            json!({ "script": script, "args": args }),
        )
        .await
    }

    /// Evaluates the JavaScript expression `expr` every 50 ms until it is truthy, and
    /// returns its value; errors with the last value after `timeout`.
    pub async fn wait_for(&self, expr: &str, timeout: Duration) -> Result<Value, BrowserError> {
        let script = format!("return ({expr});");
        let started = Instant::now();
        loop {
            let v = self.execute(&script, json!([])).await?;
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return Ok(v);
            }
            if started.elapsed() > timeout {
                return Err(BrowserError::Io(format!(
                    "`{expr}` still {v} after {timeout:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A PNG screenshot of the page.
    pub async fn screenshot(&self) -> Result<Vec<u8>, BrowserError> {
        use base64::Engine as _;
        let v = self
            .command("GET", &self.session_path("/screenshot"), Value::Null)
            .await?;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| BrowserError::Io(e.to_string()))
    }

    /// Writes a PNG screenshot of the page to `path` (creating its directory).
    pub async fn screenshot_to(&self, path: &Path) -> Result<(), BrowserError> {
        let png = self.screenshot().await?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| BrowserError::Io(e.to_string()))?;
        }
        std::fs::write(path, png).map_err(|e| BrowserError::Io(e.to_string()))
    }

    /// The text content of the first element `selector` matches (`None` when nothing does).
    pub async fn text(&self, selector: &str) -> Result<Option<String>, BrowserError> {
        let v = self
            .execute(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
                json!([selector]),
            )
            .await?;
        Ok(v.as_str().map(str::to_owned))
    }

    /// Sets the value of the form field `selector` matches; errors when nothing matches.
    pub async fn fill(&self, selector: &str, value: &str) -> Result<(), BrowserError> {
        let found = self
            .execute(
                "const e = document.querySelector(arguments[0]); if (!e) return false; \
                 e.value = arguments[1]; e.dispatchEvent(new Event('change', {bubbles: true})); return true;",
                json!([selector, value]),
            )
            .await?;
        if found == Value::Bool(true) {
            Ok(())
        } else {
            Err(BrowserError::Io(format!("no element {selector:?} to fill")))
        }
    }

    /// Clicks the element `selector` matches (as a user would: a submit button submits its
    /// form); errors when nothing matches.
    pub async fn click(&self, selector: &str) -> Result<(), BrowserError> {
        let found = self
            .execute(
                "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true;",
                json!([selector]),
            )
            .await?;
        if found == Value::Bool(true) {
            Ok(())
        } else {
            Err(BrowserError::Io(format!(
                "no element {selector:?} to click"
            )))
        }
    }

    /// The page's current URL.
    pub async fn url(&self) -> Result<String, BrowserError> {
        let v = self
            .command("GET", &self.session_path("/url"), Value::Null)
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Ends the session (closing Chromium) and stops chromedriver.
    pub async fn quit(mut self) {
        let path = self.session_path("");
        let _ = self.command("DELETE", &path, Value::Null).await;
        self.kill();
    }

    fn kill(&mut self) {
        // The whole group: chromedriver and every Chromium process under it.
        let group = format!("-{}", self.driver.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A static file server on a free loopback port: `GET /<path>` serves `root/<path>`
/// (`index.html` for a directory), with a content type browsers accept for ES modules.
/// Only what a test page needs: GET, no ranges, no caching, one request per connection.
#[derive(Debug)]
pub struct StaticServer {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl StaticServer {
    /// Serves `root` until dropped.
    pub async fn start(root: impl Into<PathBuf>) -> std::io::Result<StaticServer> {
        let root = Arc::new(root.into());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let root = Arc::clone(&root);
                tokio::spawn(async move {
                    let response = match read_request_path(&mut stream).await {
                        Some(path) => respond(&root, &path),
                        None => status_only(400, "Bad Request"),
                    };
                    let _ = stream.write_all(&response).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(StaticServer { addr, task })
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the request head and returns the path of a GET (query string dropped).
async fn read_request_path(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || head.len() > 16 * 1024 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.lines().next()?.split(' ');
    if parts.next()? != "GET" {
        return None;
    }
    let target = parts.next()?;
    Some(target.split(['?', '#']).next().unwrap_or("/").to_owned())
}

fn respond(root: &Path, path: &str) -> Vec<u8> {
    let relative = Path::new(path.trim_start_matches('/'));
    // Only plain names below the root: no `..`, no absolute paths.
    if relative
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return status_only(404, "Not Found");
    }
    let mut file = root.join(relative);
    if file.is_dir() {
        file = file.join("index.html");
    }
    let Ok(body) = std::fs::read(&file) else {
        return status_only(404, "Not Found");
    };
    let content_type = match file.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("json") => "application/json",
        Some("css") => "text/css",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    };
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(&body);
    out
}

fn status_only(code: u16, text: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} {text}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").into_bytes()
}
