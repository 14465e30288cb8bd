//! A stand-alone `/metrics` + `/healthz` endpoint for a process that has no HTTP API of its
//! own to hang them on (the agent), served by hyper on the caller's tokio runtime. The
//! services with an actix API serve the same text through [`crate::http::metrics_response`].
//!
//! This module owns the listening socket and the routing: `GET`/`HEAD /metrics` answers
//! what the render function returns (OpenMetrics text), `/healthz` answers `ok`, other
//! paths 404, other methods 405. Hyper parses the requests; the limits here only keep a
//! bad or slow client from costing the process anything: a bounded request head (431),
//! a deadline for it, one request per connection, and at most [`MAX_CONNECTIONS`] at once
//! (more are closed at accept).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::http::OPENMETRICS_CONTENT_TYPE;

/// Largest request head (request line plus headers) accepted; hyper's smallest buffer.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Longest wait for a complete request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Pause after a failed accept (out of file descriptors, ...) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// The running endpoint. [`MetricsServer::stop`] ends it; dropping it ends it too (the
/// accept loop sees its stop channel close).
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Binds `addr` and serves `render()` as `/metrics` on the current runtime. `render`
    /// runs once per scrape.
    pub async fn bind<F, Fut>(addr: SocketAddr, render: F) -> std::io::Result<MetricsServer>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = String> + Send + 'static,
    {
        let listener = TcpListener::bind(addr).await?;
        // The bound address (differs from the requested one for port 0).
        let addr = listener.local_addr()?;
        let render: Render = Arc::new(move || Box::pin(render()));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, render, stopped));
        tracing::info!(%addr, "Serving metrics.");
        Ok(MetricsServer { addr, stop, task })
    }

    /// The address the endpoint listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listener and every open connection, and waits until they are gone.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, render: Render, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if conns.len() >= MAX_CONNECTIONS {
                        tracing::debug!(%peer, "Too many metrics connections; closing one.");
                        drop(stream);
                    } else {
                        conns.spawn(serve_connection(stream, Arc::clone(&render)));
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

async fn serve_connection(stream: tokio::net::TcpStream, render: Render) {
    let service = service_fn(move |req| {
        let render = Arc::clone(&render);
        async move { Ok::<_, std::convert::Infallible>(respond(&req, &render).await) }
    });
    let served = http1::Builder::new()
        // One request per connection: scrapes are seconds apart, and an idle connection
        // would only hold one of the few slots.
        .keep_alive(false)
        // Scrapers do not care, but people reading raw responses do.
        .title_case_headers(true)
        .max_buf_size(MAX_REQUEST_HEAD)
        .timer(TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "Metrics connection ended with an error.");
    }
}

async fn respond<B>(req: &Request<B>, render: &Render) -> Response<Full<Bytes>> {
    let readable = matches!(*req.method(), Method::GET | Method::HEAD);
    let (status, content_type, body) = match req.uri().path() {
        "/metrics" | "/healthz" if !readable => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "method not allowed\n".to_owned(),
        ),
        "/metrics" => (StatusCode::OK, OPENMETRICS_CONTENT_TYPE, render().await),
        "/healthz" => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ok\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends `request` raw and returns the whole response (the server closes after it).
    async fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn serves_over_real_sockets_and_survives_bad_input() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap(), || async {
            "up 1\n# EOF\n".to_owned()
        })
        .await
        .unwrap();
        let addr = server.local_addr();

        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains(OPENMETRICS_CONTENT_TYPE), "{r}");
        assert!(r.ends_with("\r\n\r\nup 1\n# EOF\n"), "{r}");
        let r = exchange(addr, b"GET /healthz HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("ok\n"),
            "{r}"
        );
        let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"),
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
        assert!(r.contains("\r\nAllow: GET, HEAD\r\n"), "{r}");
        let r = exchange(addr, b"this is not http\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let r = exchange(addr, b"\x16\x03\x01 garbage\r\n\r\n").await;
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        let r = exchange(addr, huge.as_bytes()).await;
        assert!(r.starts_with("HTTP/1.1 431 "), "{r}");
        // One that connects and leaves breaks nothing.
        drop(TcpStream::connect(addr).await.unwrap());
        let r = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(r.contains("up 1\n"), "{r}");

        server.stop().await;
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }
}
