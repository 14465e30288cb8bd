//! Slow and hostile clients (issue 18, item 5): `loadtest hostile` opens clients that
//! misbehave next to a normal run (`loadtest run --scenario broadcast` in another process)
//! and records how the gateway cut each one, to compare with the close codes of
//! docs/protocol.md (section 9.1); `loadtest hostile-report` ([`verdict`]) puts that
//! together with the normal clients' latency with and without them.
//!
//! Kinds (round-robin over the hostile slots; the stalled clients are counted apart):
//! - `stalled`: a valid session that stops reading (small receive buffer) but keeps
//!   heartbeating, so only its unread pushes can get it cut (4002 `slow_consumer`);
//! - `garbage`: random bytes after the upgrade (4500, or 4501/4504 when the bytes happen to
//!   read as an oversized or wrong-version frame);
//! - `oversized`: a message announcing 1 MiB, or a frame whose body is one byte over 64 KiB
//!   (4501 `frame_too_large`);
//! - `bad_frame`: an unknown frame kind, reserved flags (4500) or version 9 (4504);
//! - `text`: a text message (4500);
//! - `ping_flood`: WebSocket pings at `--ping-rate` per second (4004 `rate_limited`);
//! - `slowloris`: the upgrade request one byte every 500 ms (the HTTP layer's request
//!   timeout: 408 or a closed socket).
//!
//! The stalled users can be fed pushes of their own straight on the bus ([`feed`]), so
//! that their backlog outgrows the kernel's socket buffers within a run.
//!
//! Every hostile slot repeats: connect, misbehave, get cut, pause, so the hostile load
//! lasts the whole run. The gateway's own close counters (`/metrics`) are read before and
//! after, since a client that stops reading cannot read the close frame meant for it.

mod attempt;
mod feed;
pub(crate) mod verdict;
mod wire;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::client::{self, BoxError};
use crate::hist::Hist;

pub(crate) use wire::Target;

/// Arguments of `loadtest hostile`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Args {
    /// Clients that stop reading (valid sessions that keep heartbeating).
    #[arg(long, default_value_t = 100)]
    pub stalled: usize,
    /// Hostile clients, spread round-robin over the hostile kinds.
    #[arg(long, default_value_t = 1000)]
    pub hostile: usize,
    /// How long to keep misbehaving, seconds.
    #[arg(long, default_value_t = 120)]
    pub secs: u64,
    /// Pause between one hostile client's attempts, ms (with +-30% jitter).
    #[arg(long, default_value_t = 2000)]
    pub pause_ms: u64,
    /// Pings per second of a ping-flood client.
    #[arg(long, default_value_t = 300)]
    pub ping_rate: u32,
    /// Receive buffer of a stalled client's socket, bytes.
    #[arg(long, default_value_t = 4096)]
    pub stalled_rcvbuf: u32,
    /// NATS URL for the stalled users' feed (`--stalled-feed-bytes`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Bytes pushed to each stalled user every `--stalled-feed-ms` straight on the bus
    /// (0: none, the stalled clients get only what everyone gets).
    #[arg(long, default_value_t = 0)]
    pub stalled_feed_bytes: usize,
    /// Interval of the stalled users' feed, ms.
    #[arg(long, default_value_t = 100)]
    pub stalled_feed_ms: u64,
    /// First source address's last octet (127.0.0.x), away from the normal clients'.
    #[arg(long, default_value_t = 200)]
    pub source_first: u8,
    /// Directory for `<name>.json`.
    #[arg(long, default_value = "loadtest-results")]
    pub out: std::path::PathBuf,
    /// Name of the results file.
    #[arg(long, default_value = "hostile-clients")]
    pub name: String,
}

/// What a client does wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Kind {
    /// Stops reading.
    Stalled,
    /// Random bytes after the upgrade.
    Garbage,
    /// A message over the size limit.
    Oversized,
    /// A frame that does not decode.
    BadFrame,
    /// A text message.
    Text,
    /// Hundreds of pings per second.
    PingFlood,
    /// An upgrade request that never ends.
    Slowloris,
}

/// The hostile kinds, in the order slots are given them.
const HOSTILE: [Kind; 6] = [
    Kind::Garbage,
    Kind::Oversized,
    Kind::BadFrame,
    Kind::Text,
    Kind::PingFlood,
    Kind::Slowloris,
];

impl Kind {
    /// The outcomes docs/protocol.md leads one to expect (see the module documentation).
    pub(crate) fn expected(self) -> &'static [&'static str] {
        match self {
            // The close frame sits behind the unread pushes: the client sees the reset
            // (its next heartbeat hits a closed socket), rarely the close itself.
            Kind::Stalled => &["close 4002", "reset", "eof"],
            Kind::Garbage => &["close 4500", "close 4501", "close 4504"],
            Kind::Oversized => &["close 4501"],
            Kind::BadFrame => &["close 4500", "close 4504"],
            Kind::Text => &["close 4500"],
            Kind::PingFlood => &["close 4004"],
            Kind::Slowloris => &["http 408", "eof", "reset"],
        }
    }
}

/// How one attempt ended, as a short key (`close 4500`, `http 408`, `eof`, `reset`,
/// `not cut`, `open at the end`, `connect error`, `refused http 503`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// The key.
    pub key: String,
    /// Misbehaviour start -> cut, when it was cut.
    pub cut_after: Option<Duration>,
}

impl Outcome {
    fn new(key: impl Into<String>, cut_after: Option<Duration>) -> Self {
        Outcome {
            key: key.into(),
            cut_after,
        }
    }
}

/// Outcomes of one kind.
#[derive(Debug, Default, Clone, Serialize)]
pub(crate) struct KindTally {
    /// Attempts made.
    pub attempts: u64,
    /// Attempts per outcome key.
    pub outcomes: BTreeMap<String, u64>,
    /// Attempts whose outcome is not one of the expected (connect errors and clients
    /// still open when the run ended excepted).
    pub unexpected: u64,
    /// Misbehaviour start -> cut, µs.
    #[serde(skip)]
    pub cut: Hist,
    /// Cut p50 / p99 / max, ms.
    pub cut_p50_ms: f64,
    /// p99.
    pub cut_p99_ms: f64,
    /// max.
    pub cut_max_ms: f64,
    /// The expected outcomes.
    pub expected: Vec<String>,
}

/// Outcomes that say nothing about the gateway's handling of the misbehaviour.
const NEUTRAL: [&str; 2] = ["connect error", "open at the end"];

/// Everything the clients have seen so far.
#[derive(Debug, Default)]
struct Tally {
    kinds: BTreeMap<Kind, KindTally>,
    /// Stalled slots that were never cut (the run ended first, or the gateway never did).
    stalled_never_cut: u64,
}

impl Tally {
    fn record(&mut self, kind: Kind, outcome: &Outcome) {
        let t = self.kinds.entry(kind).or_default();
        t.attempts += 1;
        *t.outcomes.entry(outcome.key.clone()).or_insert(0) += 1;
        let neutral = NEUTRAL.contains(&outcome.key.as_str());
        if !neutral && !kind.expected().contains(&outcome.key.as_str()) {
            t.unexpected += 1;
        }
        if let Some(d) = outcome.cut_after {
            t.cut.record(d.as_micros() as u64);
        }
    }
}

/// What every client task shares.
pub(crate) struct Ctx {
    target: Target,
    secret: String,
    args: Args,
    deadline: Instant,
    tally: Mutex<Tally>,
}

impl Ctx {
    fn token(&self, slot: usize) -> String {
        client::sign(&self.secret, &format!("hostile-{slot}"), "app")
    }

    fn source(&self, slot: usize) -> Ipv4Addr {
        client::source_for(slot, self.args.source_first, 16)
    }

    fn left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// Runs the hostile clients for `--secs` against the first of `urls`; writes
/// `<out>/<name>.json` and prints a table.
pub(crate) async fn run(urls: &[String], secret: &str, args: Args) -> Result<(), BoxError> {
    let url = urls.first().ok_or("no --urls")?;
    let target = Target::parse(url)?;
    let before = gateway_closes(target.addr).await;
    let ctx = Arc::new(Ctx {
        target: target.clone(),
        secret: secret.to_owned(),
        deadline: Instant::now() + Duration::from_secs(args.secs),
        args: args.clone(),
        tally: Mutex::new(Tally::default()),
    });
    let tcp_mem_max = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn(feed::sample_tcp_mem(
        Arc::clone(&ctx),
        Arc::clone(&tcp_mem_max),
    ));
    let feeder = (args.stalled_feed_bytes > 0 && args.stalled > 0).then(|| {
        tokio::spawn(feed::stalled_users(
            Arc::clone(&ctx),
            args.nats_url.clone(),
            args.stalled_feed_bytes,
            Duration::from_millis(args.stalled_feed_ms.max(1)),
        ))
    });
    let mut tasks = Vec::new();
    for slot in 0..args.stalled + args.hostile {
        let kind = if slot < args.stalled {
            Kind::Stalled
        } else {
            HOSTILE[(slot - args.stalled) % HOSTILE.len()]
        };
        tasks.push(tokio::spawn(slot_loop(Arc::clone(&ctx), slot, kind)));
        // Spread the first attempts over a second rather than 1,100 handshakes at once.
        tokio::time::sleep(Duration::from_micros(
            1_000_000 / (args.stalled + args.hostile).max(1) as u64,
        ))
        .await;
    }
    for t in tasks {
        let _ = t.await;
    }
    let fed = match feeder {
        Some(f) => match f.await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("stalled users' feed: {e}").into()),
            Err(e) => return Err(format!("stalled users' feed: {e}").into()),
        },
        None => 0,
    };
    sampler.abort();
    let extra = Extra {
        fed,
        tcp_mem_max_kib: tcp_mem_max.load(std::sync::atomic::Ordering::Relaxed),
    };
    // Let the gateway count the last closes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = gateway_closes(target.addr).await;
    let delta: BTreeMap<String, u64> = after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    let tally = std::mem::take(&mut *ctx.tally.lock().unwrap_or_else(|e| e.into_inner()));
    write_results(&args, tally, &delta, &extra)
}

/// Figures beside the tally.
struct Extra {
    /// Pushes published to stalled users.
    fed: u64,
    /// Highest TCP buffer memory of the machine during the run, KiB.
    tcp_mem_max_kib: u64,
}

/// One slot: attempt after attempt until the deadline (a stalled client stays stalled
/// until it is cut, then stalls again on a new connection).
async fn slot_loop(ctx: Arc<Ctx>, slot: usize, kind: Kind) {
    let mut n = 0u64;
    let mut cut_once = false;
    while ctx.left() > Duration::from_secs(1) {
        let outcome = attempt::run(&ctx, slot, kind, n).await;
        cut_once |= outcome.cut_after.is_some();
        ctx.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(kind, &outcome);
        n += 1;
        let jitter = 0.7 + 0.6 * ((slot as u64 * 7919 + n * 104_729) % 1000) as f64 / 1000.0;
        let pause = Duration::from_millis(ctx.args.pause_ms).mul_f64(jitter);
        tokio::time::sleep(pause.min(ctx.left())).await;
    }
    if kind == Kind::Stalled && !cut_once {
        ctx.tally
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stalled_never_cut += 1;
    }
}

/// The gateway's `ws_gateway_closes_total` by reason (empty when `/metrics` is not there).
async fn gateway_closes(addr: SocketAddr) -> BTreeMap<String, u64> {
    let Ok(r) = crate::http::request(
        addr,
        reqwest::Method::GET,
        "/metrics",
        "",
        None,
        Duration::from_secs(5),
    )
    .await
    else {
        return BTreeMap::new();
    };
    parse_closes(&String::from_utf8_lossy(&r.body))
}

/// Reads `ws_gateway_closes_total{reason="x"} n` lines.
fn parse_closes(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("ws_gateway_closes_total{reason=\"")?;
            let (reason, rest) = rest.split_once("\"}")?;
            let n: f64 = rest.trim().parse().ok()?;
            Some((reason.to_owned(), n as u64))
        })
        .collect()
}

/// Writes the results file and prints the table.
fn write_results(
    args: &Args,
    mut tally: Tally,
    gateway_closes: &BTreeMap<String, u64>,
    extra: &Extra,
) -> Result<(), BoxError> {
    println!("== hostile clients ({} s)", args.secs);
    for (kind, t) in &mut tally.kinds {
        t.cut_p50_ms = t.cut.ms(50.0);
        t.cut_p99_ms = t.cut.ms(99.0);
        t.cut_max_ms = t.cut.ms(100.0);
        t.expected = kind.expected().iter().map(|s| (*s).to_owned()).collect();
        println!(
            "  {kind:?}: {} attempts, {:?}, unexpected {}, cut p50/p99/max {:.0}/{:.0}/{:.0} ms",
            t.attempts, t.outcomes, t.unexpected, t.cut_p50_ms, t.cut_p99_ms, t.cut_max_ms
        );
    }
    println!(
        "  stalled users fed {} pushes of {} B; machine TCP buffer memory max {:.1} MiB",
        extra.fed,
        args.stalled_feed_bytes,
        extra.tcp_mem_max_kib as f64 / 1024.0
    );
    println!(
        "  stalled clients never cut: {}; gateway closes by reason during the run: {gateway_closes:?}",
        tally.stalled_never_cut
    );
    let doc = serde_json::json!({
        "stalled": args.stalled,
        "hostile": args.hostile,
        "secs": args.secs,
        "pause_ms": args.pause_ms,
        "ping_rate": args.ping_rate,
        "kinds": tally.kinds.iter().map(|(k, t)| (serde_json::to_value(k).unwrap_or_default().as_str().unwrap_or("").to_owned(), serde_json::to_value(t).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
        "gateway_closes": gateway_closes,
        "stalled_never_cut": tally.stalled_never_cut,
        "stalled_feed_bytes": args.stalled_feed_bytes,
        "stalled_feed_ms": args.stalled_feed_ms,
        "stalled_pushes_fed": extra.fed,
        "tcp_mem_max_kib": extra.tcp_mem_max_kib,
    });
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!("{}.json", args.name));
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
    println!("results: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_counters_are_read_from_openmetrics() {
        let text = "# TYPE ws_gateway_closes counter\nws_gateway_closes_total{reason=\"slow_consumer\"} 12\nws_gateway_closes_total{reason=\"protocol_error\"} 3\nother 1\n";
        let m = parse_closes(text);
        assert_eq!(m.get("slow_consumer"), Some(&12));
        assert_eq!(m.get("protocol_error"), Some(&3));
    }

    #[test]
    fn only_undocumented_outcomes_count_as_unexpected() {
        let mut t = Tally::default();
        t.record(Kind::Text, &Outcome::new("close 4500", None));
        t.record(Kind::Text, &Outcome::new("connect error", None));
        t.record(Kind::Text, &Outcome::new("close 4001", None));
        assert_eq!(t.kinds[&Kind::Text].unexpected, 1);
    }
}
