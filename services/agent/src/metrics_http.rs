//! The optional Prometheus endpoint: a deliberately tiny HTTP/1.1 server on the agent's
//! tokio runtime, started by [`crate::start`] when `metrics_listen` is configured.
//!
//! This module owns the listening socket, the request parsing and the responses:
//! `GET /metrics` answers the [`AgentMetrics`] (plus the outbox length, read on a blocking
//! thread at scrape time) as Prometheus text format 0.0.4, `GET /healthz` answers `ok`,
//! any other path 404, other methods on those paths 405, and a malformed request 400.
//! `HEAD` is answered like `GET` without the body.
//!
//! It is not a general web server and does not try to be: one request per connection (the
//! response says `Connection: close`), no request bodies, no keep-alive, no chunking. What
//! it guarantees is that bad input cannot hurt the agent: the request head is bounded
//! ([`MAX_REQUEST_HEAD`], else 431), reading it has a deadline ([`READ_TIMEOUT`], else 408),
//! writes have one too, at most [`MAX_CONNECTIONS`] connections are served at once (more
//! are closed at accept), and every failure ends only that connection.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::outbox::Outbox;
use crate::prom::AgentMetrics;

/// Largest request head (request line plus headers) accepted.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Longest wait for a complete request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a response to be written.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the response, how long unread input is drained before the socket is closed (so
/// the client is not sent a reset that could destroy the response in flight).
const LINGER: Duration = Duration::from_millis(200);
/// Most bytes drained after the response.
const LINGER_BYTES: usize = 64 * 1024;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Pause after a failed accept (out of file descriptors, ...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The content type of Prometheus text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A parsed request head: what the router needs and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (methods are case-sensitive).
    pub method: String,
    /// The target's path, without the query string.
    pub path: String,
}

/// Why a request head is unacceptable; each becomes a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The head is not `METHOD SP TARGET SP VERSION` followed by header lines.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version")]
    Version,
}

/// Where a request head ends: the index just past the blank line that closes it (CRLF CRLF,
/// or bare LF LF, which RFC 9112 lets a server accept), if the buffer holds one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        match buf.get(i + 1..) {
            Some([b'\n', ..]) => Some(i + 2),
            Some([b'\r', b'\n', ..]) => Some(i + 3),
            _ => None,
        }
    })
}

/// Parses a complete request head (as delimited by [`head_end`]).
pub fn parse_request(head: &[u8]) -> Result<Request, ParseError> {
    let text = std::str::from_utf8(head).map_err(|_| ParseError::Malformed("not UTF-8"))?;
    // A server should ignore empty lines before the request line (RFC 9112 section 2.2).
    let text = text.trim_start_matches(['\r', '\n']);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ParseError::Malformed("bad request line"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(ParseError::Malformed("bad method"));
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ParseError::Malformed("bad request target"));
    }
    if !version.starts_with("HTTP/") {
        return Err(ParseError::Malformed("bad HTTP version"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ParseError::Version);
    }
    for line in lines.take_while(|l| !l.is_empty()) {
        let Some((name, _value)) = line.split_once(':') else {
            return Err(ParseError::Malformed("header line without a colon"));
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            return Err(ParseError::Malformed("bad header name"));
        }
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Ok(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// A token character (RFC 9110 section 5.6.2), for methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET /metrics`.
    Metrics,
    /// `GET /healthz`.
    Healthz,
    /// A known path with a method other than GET or HEAD.
    MethodNotAllowed,
    /// Any other path.
    NotFound,
}

/// Routes a parsed request.
pub fn route(req: &Request) -> Route {
    let known = match req.path.as_str() {
        "/metrics" => Route::Metrics,
        "/healthz" => Route::Healthz,
        _ => return Route::NotFound,
    };
    match req.method.as_str() {
        "GET" | "HEAD" => known,
        _ => Route::MethodNotAllowed,
    }
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    /// Leave the body out (a HEAD request); the length still describes it.
    head_only: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Self {
        Response {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            head_only: false,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n{allow}\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len(),
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

/// What the connections share.
#[derive(Debug)]
struct State {
    metrics: Arc<AgentMetrics>,
    /// Weak, so a scrape in flight never keeps the database open after the agent stopped.
    outbox: Weak<Outbox>,
    read_timeout: Duration,
}

/// The running endpoint. [`MetricsServer::stop`] ends it; dropping it ends it too (the
/// accept loop sees its stop channel close).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and starts serving `metrics` (and the length of `outbox`, while it is
    /// open) on the current runtime.
    pub async fn bind(
        addr: SocketAddr,
        metrics: Arc<AgentMetrics>,
        outbox: Weak<Outbox>,
    ) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Self::spawn(
            listener,
            State {
                metrics,
                outbox,
                read_timeout: READ_TIMEOUT,
            },
        ))
    }

    fn spawn(listener: TcpListener, state: State) -> MetricsServer {
        // The bound address (differs from the requested one for port 0).
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(listener, Arc::new(state), stopped));
        tracing::info!(%addr, "Serving metrics.");
        MetricsServer { addr, stop, task }
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every open connection, and waits until they are gone.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, mut stop: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        tracing::debug!(%peer, "Too many metrics connections; closing one.");
                        drop(stream);
                    } else {
                        conns.spawn(serve_connection(stream, Arc::clone(&state)));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting a metrics connection failed.");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Resolves when a stop is requested or the [`MetricsServer`] is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Why no request head could be read.
#[derive(Debug)]
enum ReadError {
    /// The peer closed (or failed) before sending anything: nothing to answer.
    Gone,
    /// The peer closed after a partial head.
    Incomplete,
    /// The head is longer than [`MAX_REQUEST_HEAD`].
    TooLarge,
}

/// Reads until the end of the request head; returns the head.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) if buf.is_empty() => return Err(ReadError::Gone),
            Ok(0) => return Err(ReadError::Incomplete),
            Ok(n) => n,
            Err(_) => return Err(ReadError::Gone),
        };
        // Only the new bytes (and the three before them) can complete the blank line.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = buf.get(from..).and_then(head_end) {
            buf.truncate(from + end);
            return Ok(buf);
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Err(ReadError::TooLarge);
        }
    }
}

async fn serve_connection(mut stream: TcpStream, state: Arc<State>) {
    let response = match tokio::time::timeout(state.read_timeout, read_head(&mut stream)).await {
        Err(_) => Response::text(408, "Request Timeout", "request timeout\n"),
        Ok(Err(ReadError::Gone)) => return,
        Ok(Err(ReadError::Incomplete)) => Response::text(400, "Bad Request", "incomplete\n"),
        Ok(Err(ReadError::TooLarge)) => Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
        Ok(Ok(head)) => match parse_request(&head) {
            Ok(req) => respond(&req, &state).await,
            Err(e) => Response::text(400, "Bad Request", format!("{e}\n")),
        },
    };
    let bytes = response.encode();
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&bytes).await?;
        stream.shutdown().await
    })
    .await;
    if matches!(written, Ok(Ok(()))) {
        // Read (and discard) what the client still sends until it closes, briefly.
        let _ = tokio::time::timeout(LINGER, async {
            let mut chunk = [0u8; 1024];
            let mut drained = 0;
            while drained < LINGER_BYTES {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }
}

async fn respond(req: &Request, state: &State) -> Response {
    let mut response = match route(req) {
        Route::Metrics => Response {
            content_type: METRICS_CONTENT_TYPE,
            ..Response::text(200, "OK", state.metrics.render(outbox_len(state).await))
        },
        Route::Healthz => Response::text(200, "OK", "ok\n"),
        Route::MethodNotAllowed => {
            Response::text(405, "Method Not Allowed", "method not allowed\n")
        }
        Route::NotFound => Response::text(404, "Not Found", "not found\n"),
    };
    response.head_only = req.method == "HEAD";
    response
}

/// The outbox's length, read on a blocking thread; `None` if it is closed or unreadable.
async fn outbox_len(state: &State) -> Option<u64> {
    let outbox = state.outbox.upgrade()?;
    match tokio::task::spawn_blocking(move || outbox.len()).await {
        Ok(Ok(n)) => Some(n),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "Cannot read the outbox length for metrics.");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str) -> Request {
        Request {
            method: method.to_owned(),
            path: path.to_owned(),
        }
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\n"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn parses_good_requests() {
        let r = parse_request(b"GET /metrics HTTP/1.1\r\nHost: a:1\r\nAccept: */*\r\n\r\n");
        assert_eq!(r, Ok(req("GET", "/metrics")));
        // Query strings are ignored; HTTP/1.0 and bare LFs are fine; so is a leading CRLF.
        let r = parse_request(b"GET /metrics?x=1 HTTP/1.0\n\n");
        assert_eq!(r, Ok(req("GET", "/metrics")));
        let r = parse_request(b"\r\nHEAD /healthz HTTP/1.1\r\n\r\n");
        assert_eq!(r, Ok(req("HEAD", "/healthz")));
        // Header values may hold anything printable, including colons.
        let r = parse_request(b"GET / HTTP/1.1\r\nX-A: b:c \t d\r\n\r\n");
        assert_eq!(r, Ok(req("GET", "/")));
    }

    #[test]
    fn rejects_bad_requests() {
        let cases: &[&[u8]] = &[
            b"",
            b"\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"G(T /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET http://a/metrics HTTP/1.1\r\n\r\n",
            b"GET /met\x01rics HTTP/1.1\r\n\r\n",
            b"GET /metrics FTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\n\r\n",
        ];
        for bad in cases {
            assert!(
                matches!(parse_request(bad), Err(ParseError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_request(b"GET /metrics HTTP/2.0\r\n\r\n"),
            Err(ParseError::Version)
        );
    }

    #[test]
    fn routes() {
        assert_eq!(route(&req("GET", "/metrics")), Route::Metrics);
        assert_eq!(route(&req("HEAD", "/metrics")), Route::Metrics);
        assert_eq!(route(&req("GET", "/healthz")), Route::Healthz);
        assert_eq!(route(&req("POST", "/metrics")), Route::MethodNotAllowed);
        assert_eq!(route(&req("get", "/metrics")), Route::MethodNotAllowed);
        assert_eq!(route(&req("GET", "/")), Route::NotFound);
        assert_eq!(route(&req("GET", "/metrics/")), Route::NotFound);
        assert_eq!(route(&req("DELETE", "/nope")), Route::NotFound);
    }

    #[test]
    fn responses_close_and_head_leaves_the_body_out() {
        let mut r = Response::text(200, "OK", "ok\n");
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("\r\nContent-Length: 3\r\n"), "{text}");
        assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nok\n"), "{text}");
        r.head_only = true;
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.contains("\r\nContent-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        let text =
            String::from_utf8(Response::text(405, "Method Not Allowed", "").encode()).unwrap();
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
    }

    /// Sends `request` raw and returns the whole response (the server closes after it).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    /// A server on a free loopback port with a short read timeout and no outbox.
    async fn test_server(read_timeout: Duration) -> (MetricsServer, Arc<AgentMetrics>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Arc::new(AgentMetrics::new());
        let server = MetricsServer::spawn(
            listener,
            State {
                metrics: Arc::clone(&metrics),
                outbox: Weak::new(),
                read_timeout,
            },
        );
        (server, metrics)
    }

    #[tokio::test]
    async fn serves_over_real_sockets_and_survives_bad_input() {
        let (server, metrics) = test_server(Duration::from_millis(300)).await;
        let addr = server.local_addr();
        metrics.session_started();

        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(METRICS_CONTENT_TYPE), "{r}");
        assert!(r.contains("\nagent_connected 1\n"), "{r}");
        // No outbox: its gauge is left out rather than made up.
        assert!(!r.contains("agent_outbox_entries"), "{r}");

        let r = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"),
            "{r}"
        );
        let r = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
        let r = exchange(
            addr,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        )
        .await;
        assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
        let r = exchange(addr, b"\x16\x03\x01 garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let r = exchange(addr, huge.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        // A client that never finishes its head gets a 408 after the read timeout.
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(r.starts_with("HTTP/1.1 408 "), "{r}");
        // One that connects and leaves gets nothing, and breaks nothing.
        drop(TcpStream::connect(addr).await.unwrap());

        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
            "{r}"
        );
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("\nagent_connected 1\n"), "{r}");

        server.stop().await;
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
