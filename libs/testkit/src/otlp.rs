//! A real OTLP/HTTP trace receiver for tests and benchmarks: it listens on a free loopback
//! port, accepts `POST /v1/traces` bodies in protobuf (what `opentelemetry-otlp`'s HTTP
//! exporter sends), decodes them and keeps every span, flattened, for assertions. Services
//! under test are pointed at it with `OTEL_EXPORTER_OTLP_ENDPOINT`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One received span, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// Span name.
    pub name: String,
    /// Trace id, 32 hex characters.
    pub trace_id: String,
    /// Span id, 16 hex characters.
    pub span_id: String,
    /// Parent span id, 16 hex characters, empty for a root.
    pub parent_span_id: String,
    /// OTLP span kind (1 internal, 2 server, 3 client, 4 producer, 5 consumer).
    pub kind: i32,
    /// String and integer attributes, as strings.
    pub attributes: Vec<(String, String)>,
    /// Start, Unix nanoseconds.
    pub start_ns: u64,
    /// End, Unix nanoseconds.
    pub end_ns: u64,
}

impl Span {
    /// The value of attribute `key`.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// OTLP span kinds.
pub mod kind {
    /// Server.
    pub const SERVER: i32 = 2;
    /// Producer.
    pub const PRODUCER: i32 = 4;
    /// Consumer.
    pub const CONSUMER: i32 = 5;
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<u64>>,
    counted: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    /// Starts listening on a free loopback port (call inside a tokio runtime).
    pub async fn start() -> std::io::Result<Receiver> {
        Self::start_with(true).await
    }

    /// Like [`Receiver::start`], but only counts spans (for long benchmark runs).
    pub async fn start_counting() -> std::io::Result<Receiver> {
        Self::start_with(false).await
    }

    async fn start_with(keep: bool) -> std::io::Result<Receiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(0));
        let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sink = Sink {
            spans: Arc::clone(&spans),
            requests: Arc::clone(&requests),
            counted: Arc::clone(&counted),
            keep,
        };
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, sink).await;
                });
            }
        });
        Ok(Receiver {
            addr,
            spans,
            requests,
            counted,
            task,
        })
    }

    /// The base URL to put in `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// How many spans arrived so far (kept or not).
    pub fn span_count(&self) -> u64 {
        self.counted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        self.requests.lock().map(|r| *r).unwrap_or(0)
    }

    /// Waits until `done(spans)` holds or `timeout` passes; returns the spans either way.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Where received spans go.
#[derive(Debug, Clone)]
struct Sink {
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<u64>>,
    counted: Arc<std::sync::atomic::AtomicU64>,
    keep: bool,
}

/// Serves HTTP/1.1 requests on one (keep-alive) connection.
async fn serve(stream: TcpStream, sink: Sink) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let path_ok = line.starts_with("POST /v1/traces");
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).await?;
        let status = match (path_ok, ExportTraceServiceRequest::decode(&body[..])) {
            (true, Ok(request)) => {
                if let Ok(mut n) = sink.requests.lock() {
                    *n += 1;
                }
                let spans = flatten(request);
                sink.counted
                    .fetch_add(spans.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if sink.keep
                    && let Ok(mut all) = sink.spans.lock()
                {
                    all.extend(spans);
                }
                "200 OK"
            }
            (false, _) => "404 Not Found",
            (true, Err(_)) => "400 Bad Request",
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        );
        reader.get_mut().write_all(response.as_bytes()).await?;
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(|v| value_string(v.value.as_ref()))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(Span {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    kind: span.kind,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                            (kv.key.clone(), value_string(v))
                        })
                        .collect(),
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                });
            }
        }
    }
    out
}

fn value_string(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
