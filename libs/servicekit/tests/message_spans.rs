#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Message spans under a real OpenTelemetry layer (in-memory exporter): parenting to the
//! incoming context, handing on their own, and head sampling honoured downstream.

use messages::TraceContext;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, Sampler, SdkTracerProvider, SpanData};
use servicekit::telemetry::{MessageSpan, Operation, TARGET};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;

/// Runs `f` under an OpenTelemetry layer; returns what `f` returned and the spans it
/// finished (read before the provider shuts down, which clears the in-memory exporter).
fn with_tracing<R>(sampler: Sampler, f: impl FnOnce() -> R) -> (R, Vec<SpanData>) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .with_sampler(sampler)
        .build();
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("test"))
        .with_filter(FilterFn::new(|m| m.target() == TARGET));
    let subscriber = tracing_subscriber::registry().with(layer);
    let out = tracing::subscriber::with_default(subscriber, f);
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    (out, spans)
}

fn incoming(flags: u8) -> TraceContext {
    TraceContext {
        trace_id: [0x11; 16],
        span_id: [0x22; 8],
        flags,
    }
}

#[test]
fn a_hop_is_the_child_of_the_incoming_context_and_hands_on_its_own() {
    let parent = incoming(1);
    let (next, spans) = with_tracing(Sampler::AlwaysOn, || {
        let hop = MessageSpan::start(Operation::Publish, "ws.msg.req.chat", 42, Some(&parent));
        hop.context().unwrap()
    });
    assert_eq!(next.trace_id, parent.trace_id);
    assert_ne!(next.span_id, parent.span_id);
    assert!(next.is_sampled());
    assert_eq!(spans.len(), 1);
    let span = &spans[0];
    assert_eq!(span.name, "publish ws.msg.req.chat");
    assert_eq!(span.span_kind, opentelemetry::trace::SpanKind::Producer);
    assert_eq!(span.parent_span_id.to_bytes(), parent.span_id);
    assert_eq!(span.span_context.span_id().to_bytes(), next.span_id);
    let dest = span
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "messaging.destination.name")
        .unwrap();
    assert_eq!(dest.value.as_str(), "ws.msg.req.chat");
}

#[test]
fn an_unsampled_incoming_context_stays_unsampled_but_keeps_its_trace_id() {
    let parent = incoming(0);
    let (next, spans) = with_tracing(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)), || {
        let hop = MessageSpan::start(Operation::Process, "ws.user.a", 1, Some(&parent));
        hop.context().unwrap()
    });
    assert_eq!(next.trace_id, parent.trace_id);
    assert!(!next.is_sampled());
    assert!(spans.is_empty());
}

#[test]
fn a_root_at_sampling_zero_still_carries_a_trace_id() {
    let (next, spans) = with_tracing(
        Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(0.0))),
        || MessageSpan::start(Operation::Publish, "ws.all", 1, None).context(),
    );
    let next = next.expect("a trace id is carried even when not sampled");
    assert!(!next.is_sampled());
    assert_ne!(next.trace_id, [0; 16]);
    assert!(spans.is_empty());
}
