//! Logs and traces for every service, set up the same way: a `tracing` subscriber with a text
//! or JSON log layer and, when an OTLP endpoint is configured, an OpenTelemetry layer that
//! exports spans over OTLP/HTTP (protobuf) to a collector such as Jaeger's port 4318.
//!
//! It also owns the *message span*: the one span each hop makes for one message (publish,
//! receive, process), named and attributed after the OpenTelemetry messaging conventions,
//! parented to the W3C context the message carried and handing its own context on to the
//! next hop. Hops never look at a message body to do this; the context travels in the frame
//! header or the `traceparent` bus header.
//!
//! Cost: message spans use their own target ([`TARGET`]) which only the OpenTelemetry layer
//! listens to. With no endpoint configured no layer is interested, `tracing` hands back a
//! disabled span, and a hop pays one callsite check; the incoming context is passed on
//! unchanged so trace ids still correlate logs across services.
//!
//! Configuration uses the standard OpenTelemetry variables, each also a flag:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (base URL, `/v1/traces` appended) or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is), `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER_ARG` (head-sampling ratio 0..=1, default 1), `OTEL_SDK_DISABLED`,
//! and for an `https` collector `OTEL_EXPORTER_OTLP_CERTIFICATE` (or
//! `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`): a PEM bundle of the CAs trusted instead of the
//! system's store. The exporter's HTTP client is reqwest with rustls ([`crate::tls`]).
//! The sampler is always parent-based: a hop that receives a context honours its sampled
//! flag, so the decision is made once, at the edge.

use std::path::{Path, PathBuf};
use std::time::Duration;

use messages::{TraceContext, subject};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{EnvFilter, FilterFn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The `tracing` target of message and request spans. Only the OpenTelemetry layer listens
/// to it, so logs are not flooded and an unconfigured exporter costs nothing.
pub const TARGET: &str = "rt_otel";

/// Telemetry settings, from flags or the standard `OTEL_*` variables.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TelemetryArgs {
    /// OTLP/HTTP base URL of a collector (for example `http://127.0.0.1:4318`); spans go to
    /// `<url>/v1/traces`. Unset: nothing is exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Full OTLP/HTTP traces URL; wins over `--otlp-endpoint`.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_traces_endpoint: Option<String>,
    /// Service name on exported spans (default: the binary's name).
    #[arg(long = "otel-service-name", env = "OTEL_SERVICE_NAME")]
    pub service_name: Option<String>,
    /// Head-sampling ratio for traces that start here, 0 to 1. Traces arriving with a
    /// context keep the sampling decision made upstream.
    #[arg(long = "trace-sampling", env = "OTEL_TRACES_SAMPLER_ARG")]
    pub sampling_ratio: Option<f64>,
    /// `true` turns exporting off whatever else is set.
    #[arg(long = "otel-sdk-disabled", env = "OTEL_SDK_DISABLED")]
    pub sdk_disabled: Option<bool>,
    /// PEM bundle of the CAs trusted for an `https` collector, instead of the system's
    /// store.
    #[arg(long = "otlp-certificate", env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_certificate: Option<PathBuf>,
    /// The same for the traces endpoint; wins over `--otlp-certificate`.
    #[arg(
        long = "otlp-traces-certificate",
        env = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE"
    )]
    pub otlp_traces_certificate: Option<PathBuf>,
}

fn nonempty(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Reads only the telemetry settings from the environment, for binaries that do not parse
/// flags with clap.
#[derive(Debug, clap::Parser)]
struct EnvOnly {
    #[command(flatten)]
    telemetry: TelemetryArgs,
}

impl TelemetryArgs {
    /// The settings from `OTEL_*` variables alone.
    pub fn from_env() -> Result<Self, TelemetryError> {
        use clap::Parser as _;
        EnvOnly::try_parse_from(["service"])
            .map(|e| e.telemetry)
            .map_err(|e| TelemetryError::Config(e.to_string()))
    }

    /// Where spans are sent, if anywhere.
    pub fn traces_endpoint(&self) -> Option<String> {
        if self.sdk_disabled == Some(true) {
            return None;
        }
        if let Some(url) = nonempty(&self.otlp_traces_endpoint) {
            return Some(url.to_owned());
        }
        nonempty(&self.otlp_endpoint)
            .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
    }

    /// The CA bundle trusted for the collector, if one is configured.
    pub fn certificate(&self) -> Option<&Path> {
        [&self.otlp_traces_certificate, &self.otlp_certificate]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .find(|p| !p.as_os_str().is_empty())
    }

    /// The head-sampling ratio, checked.
    pub fn ratio(&self) -> Result<f64, TelemetryError> {
        let ratio = self.sampling_ratio.unwrap_or(1.0);
        if (0.0..=1.0).contains(&ratio) {
            Ok(ratio)
        } else {
            Err(TelemetryError::Config(format!(
                "the trace sampling ratio must be between 0 and 1, got {ratio}"
            )))
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A setting is out of range or unparsable.
    #[error("telemetry configuration: {0}")]
    Config(String),
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    /// The collector's TLS settings cannot be used (CA file, system store).
    #[error("OTLP exporter TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A global subscriber was already installed.
    #[error("logging was already initialised: {0}")]
    AlreadyInitialised(String),
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

impl LogFormat {
    /// `"json"` or anything else as text.
    pub fn parse(s: &str) -> Self {
        if s.eq_ignore_ascii_case("json") {
            LogFormat::Json
        } else {
            LogFormat::Text
        }
    }
}

/// Keeps the exporter alive; dropping it flushes the spans still buffered.
#[derive(Debug)]
#[must_use = "dropping the guard stops exporting"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The HTTP exporter runs on the batch processor's own thread, so shutting down
            // from any thread (even actix's) completes.
            let _ = provider.shutdown_with_timeout(Duration::from_secs(5));
        }
    }
}

/// Installs the global subscriber: logs filtered by `RUST_LOG` (default `info`) on stderr,
/// and spans exported over OTLP when `args` names an endpoint.
pub fn init(
    default_service: &str,
    format: LogFormat,
    args: &TelemetryArgs,
) -> Result<Telemetry, TelemetryError> {
    let ratio = args.ratio()?;
    let provider = match args.traces_endpoint() {
        Some(endpoint) => Some(provider(
            &endpoint,
            args.service_name.as_deref().unwrap_or(default_service),
            ratio,
            args.certificate(),
        )?),
        None => None,
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let not_spans = FilterFn::new(|meta| meta.target() != TARGET);
    let logs = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
    }
    .with_filter(filter)
    .with_filter(not_spans);
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("rt"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_filter(FilterFn::new(|meta| meta.target() == TARGET))
    });
    Registry::default()
        .with(logs)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::AlreadyInitialised(e.to_string()))?;
    if provider.is_some() {
        tracing::info!(ratio, "Exporting traces over OTLP.");
    }
    Ok(Telemetry { provider })
}

/// [`init`] for a binary's `main`: on failure prints `<service>: <error>` and hands back
/// exit code 64 (EX_USAGE) to return.
pub fn init_main(
    service: &str,
    log_format: &str,
    args: &TelemetryArgs,
) -> Result<Telemetry, std::process::ExitCode> {
    init(service, LogFormat::parse(log_format), args).map_err(|e| {
        eprintln!("{service}: {e}");
        std::process::ExitCode::from(64)
    })
}

/// The exporter's HTTP client: reqwest with rustls (ring), trusting `ca_file` or else the
/// system's store when the endpoint is `https`. Built here rather than by the exporter so
/// the crypto provider is ours and never a process-level guess.
fn http_client(
    endpoint: &str,
    ca_file: Option<&Path>,
) -> Result<reqwest::blocking::Client, TelemetryError> {
    let https = endpoint
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"));
    let roots = match ca_file {
        Some(path) => crate::tls::roots_from_file(path)?,
        None if https => crate::tls::platform_roots()?,
        None => crate::tls::RootCertStore::empty(),
    };
    let tls = crate::tls::client_config(roots, &[])?;
    // The blocking client starts its own runtime, which must not happen on an async thread
    // (init may be called inside one): build it on a plain thread, as the exporter would.
    std::thread::Builder::new()
        .name("otlp-http-client".into())
        .spawn(move || {
            reqwest::blocking::Client::builder()
                .tls_backend_preconfigured(tls)
                .timeout(Duration::from_secs(5))
                .build()
        })
        .map_err(|e| TelemetryError::Exporter(format!("cannot start a thread: {e}")))?
        .join()
        .map_err(|_| TelemetryError::Exporter("building the HTTP client panicked".into()))?
        .map_err(|e| TelemetryError::Exporter(format!("cannot build the HTTP client: {e}")))
}

fn provider(
    endpoint: &str,
    service: &str,
    ratio: f64,
    ca_file: Option<&Path>,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(http_client(endpoint, ca_file)?)
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .with_headers(Default::default())
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_owned())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(BatchSpanProcessor::builder(exporter).build())
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(resource)
        .build())
}

/// What a hop does with a message, after the messaging conventions' operation types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Handing a message to the bus (span kind producer).
    Publish,
    /// Taking a message off the bus or a socket and acting on it (span kind consumer).
    Process,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Process => "process",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Operation::Publish => "producer",
            Operation::Process => "consumer",
        }
    }
}

/// One hop's span for one message, and the context the next hop must receive.
#[derive(Debug)]
pub struct MessageSpan {
    span: Span,
    next: Option<TraceContext>,
}

impl MessageSpan {
    /// Starts the span for `operation` on `destination` (a subject), named
    /// `"<operation> <family>"` where the family is the subject without its
    /// high-cardinality tokens (`ws.user`, not `ws.user.alice`). It is the child of
    /// `incoming` when the message carried a context, otherwise the root of a new trace
    /// whose sampling is decided here.
    pub fn start(
        operation: Operation,
        destination: &str,
        msg_id: u64,
        incoming: Option<&TraceContext>,
    ) -> Self {
        let span = tracing::info_span!(
            target: TARGET,
            "message",
            otel.name = %format_args!("{} {}", operation.as_str(), subject::family(destination)),
            otel.kind = operation.kind(),
            messaging.system = "nats",
            messaging.operation.type = operation.as_str(),
            messaging.destination.name = destination,
            messaging.message.id = msg_id,
        );
        Self::with_parent(span, incoming)
    }

    /// Wraps a span the caller made (for example an HTTP server span) the same way.
    pub fn with_parent(span: Span, incoming: Option<&TraceContext>) -> Self {
        if span.is_disabled() {
            return MessageSpan {
                span,
                next: incoming.copied(),
            };
        }
        if let Some(parent) = incoming {
            let _ = span.set_parent(remote(parent));
        }
        let next = own_context(&span).or(incoming.copied());
        MessageSpan { span, next }
    }

    /// The context to send with the message to the next hop: this span's when exporting,
    /// otherwise the incoming one unchanged.
    pub fn context(&self) -> Option<TraceContext> {
        self.next
    }

    /// The trace id for log fields, as 32 hex characters, or empty.
    pub fn trace_id(&self) -> String {
        self.next.map(|t| t.trace_id_hex()).unwrap_or_default()
    }

    /// The span, to enter or to record into.
    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Marks the span as failed with a reason.
    pub fn fail(&self, reason: &str) {
        if !self.span.is_disabled() {
            self.span
                .set_status(opentelemetry::trace::Status::error(reason.to_owned()));
        }
    }
}

/// The server span of one HTTP API request, the child of the caller's `traceparent` header
/// when it sent one, else the root of a trace sampled here (the API is an edge). `route` is
/// the route template (`/v1/push`), never the raw path.
pub fn server_span(req: &actix_web::HttpRequest, route: &'static str) -> MessageSpan {
    let method = req.method().as_str();
    let span = tracing::info_span!(
        target: TARGET,
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
    );
    let incoming = req
        .headers()
        .get(messages::headers::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse_traceparent);
    MessageSpan::with_parent(span, incoming.as_ref())
}

/// For a message a service takes off the bus: records its per-hop latencies (arrival as
/// `svc-in`) and, when it carries a trace context, starts the consumer span continuing that
/// trace. Messages without a context (presence and heartbeat traffic) start no trace: they
/// would each be a one-span trace of their own.
pub fn on_receive(
    msg: &async_nats::Message,
    hops: &crate::hops::HopLatency,
) -> Option<MessageSpan> {
    use messages::headers;
    let map = msg.headers.as_ref()?;
    hops.record(map, headers::hop::SERVICE_IN, headers::now_micros());
    let incoming = TraceContext::extract(map)?;
    let msg_id = headers::get(map, headers::MSG_ID)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Some(MessageSpan::start(
        Operation::Process,
        &msg.subject,
        msg_id,
        Some(&incoming),
    ))
}

fn remote(parent: &TraceContext) -> opentelemetry::Context {
    let context = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.span_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(context)
}

fn own_context(span: &Span) -> Option<TraceContext> {
    let context = span.context();
    let own = context.span();
    let own = own.span_context();
    if !own.is_valid() {
        return None;
    }
    Some(TraceContext {
        trace_id: own.trace_id().to_bytes(),
        span_id: own.span_id().to_bytes(),
        flags: own.trace_flags().to_u8(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(endpoint: Option<&str>, traces: Option<&str>) -> TelemetryArgs {
        TelemetryArgs {
            otlp_endpoint: endpoint.map(str::to_owned),
            otlp_traces_endpoint: traces.map(str::to_owned),
            ..TelemetryArgs::default()
        }
    }

    #[test]
    fn endpoint_resolution_follows_the_otel_spec() {
        assert_eq!(args(None, None).traces_endpoint(), None);
        assert_eq!(
            args(Some("http://c:4318/"), None)
                .traces_endpoint()
                .as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(
            args(Some("http://c:4318"), Some("http://d/x"))
                .traces_endpoint()
                .as_deref(),
            Some("http://d/x")
        );
        let mut off = args(Some("http://c:4318"), None);
        off.sdk_disabled = Some(true);
        assert_eq!(off.traces_endpoint(), None);
        assert_eq!(args(Some("  "), None).traces_endpoint(), None);
    }

    #[test]
    fn ratio_is_checked() {
        let mut a = TelemetryArgs::default();
        assert_eq!(a.ratio().ok(), Some(1.0));
        a.sampling_ratio = Some(0.01);
        assert_eq!(a.ratio().ok(), Some(0.01));
        a.sampling_ratio = Some(1.5);
        assert!(a.ratio().is_err());
        a.sampling_ratio = Some(-0.1);
        assert!(a.ratio().is_err());
    }

    #[test]
    fn without_a_subscriber_the_incoming_context_passes_through() {
        let incoming = TraceContext {
            trace_id: [7; 16],
            span_id: [9; 8],
            flags: 1,
        };
        let hop = MessageSpan::start(Operation::Publish, "ws.user.a", 1, Some(&incoming));
        assert_eq!(hop.context(), Some(incoming));
        assert_eq!(hop.trace_id(), "07".repeat(16));
        let root = MessageSpan::start(Operation::Publish, "ws.user.a", 1, None);
        assert_eq!(root.context(), None);
    }
}
