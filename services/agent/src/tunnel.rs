//! The agent's end of TCP tunnels (docs/protocol.md 12.12, ADR 0014): a signed
//! `agent.tunnel.open` names a stream and a remote address; the agent dials it only if it
//! is on `tunnel_allow`, then carries bytes between that TCP connection and the stream's
//! frames on its one gateway connection.
//!
//! Each stream is one task holding its TCP connection. Frames for it arrive from the
//! session loop through an unbounded channel, which the credit window bounds: a peer that
//! sends more than the agent granted has its stream reset. Upward frames go to the session
//! loop through another channel, again bounded by the windows the scheduler grants; the
//! session loop paces them below the gateway's frame rate, and heartbeats never wait
//! behind them. Streams live as long as the session: a reconnect drops them all (the
//! scheduler closes its ends when it sees the agent's socket go away).

use std::collections::HashMap;
use std::time::Duration;

use messages::payload;
use messages::tunnel::{self, CloseReason, Credit, Receive};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long dialling the remote address may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest idle timeout honoured, whatever the open asks for.
const MIN_IDLE: Duration = Duration::from_secs(1);

/// What the stream tasks hand the session loop.
#[derive(Debug)]
pub(crate) enum Up {
    /// Publish `body` on `route`.
    Frame {
        /// A [`messages::tunnel`] route.
        route: &'static str,
        /// The MessagePack body.
        body: Vec<u8>,
    },
    /// The stream ended; forget it.
    Ended(u64),
}

/// A frame for one stream, already matched to it by its token.
#[derive(Debug)]
enum Down {
    Data(tunnel::Data),
    Window(u32),
    Close,
}

/// A live stream as the session loop knows it.
#[derive(Debug)]
struct Stream {
    token: Vec<u8>,
    tx: mpsc::UnboundedSender<Down>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        // A stream outliving its session would write into a connection that is gone.
        self.task.abort();
    }
}

/// The streams of one session.
#[derive(Debug)]
pub(crate) struct Tunnels {
    allow: Vec<String>,
    max: usize,
    streams: HashMap<u64, Stream>,
    up: mpsc::UnboundedSender<Up>,
}

impl Tunnels {
    /// Streams that may dial `allow`, at most `max` at once, sending upward into `up`.
    pub(crate) fn new(allow: Vec<String>, max: usize, up: mpsc::UnboundedSender<Up>) -> Self {
        Tunnels {
            allow,
            max,
            streams: HashMap::new(),
            up,
        }
    }

    /// Streams open now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no stream is open.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Drops every stream (the session ended).
    pub(crate) fn clear(&mut self) {
        self.streams.clear();
    }

    /// A signed open was admitted: refuse it (not allowed, too many, bad token) or start
    /// its stream.
    pub(crate) fn open(&mut self, open: tunnel::Open) {
        let refuse = |reason: CloseReason, detail: String| {
            tracing::warn!(stream = open.stream, remote = %open.remote, actor = %open.actor, reason = reason.as_str(), %detail, "Tunnel refused.");
            send_close(&self.up, open.stream, &open.token, reason, detail);
        };
        if open.token.len() != tunnel::TOKEN_LEN {
            return refuse(CloseReason::Reset, "bad token length".into());
        }
        if !tunnel::allowed(&self.allow, &open.remote) {
            return refuse(
                CloseReason::NotAllowed,
                format!("{} is not on this agent's tunnel_allow", open.remote),
            );
        }
        if self.streams.contains_key(&open.stream) {
            return refuse(CloseReason::Reset, "stream id in use".into());
        }
        if self.streams.len() >= self.max {
            return refuse(
                CloseReason::TooMany,
                format!("{} tunnel streams open (tunnel_max_streams)", self.max),
            );
        }
        tracing::info!(stream = open.stream, remote = %open.remote, actor = %open.actor, "Tunnel opening.");
        let (tx, rx) = mpsc::unbounded_channel();
        let (id, token) = (open.stream, open.token.clone());
        let task = tokio::spawn(run_stream(open, rx, self.up.clone()));
        self.streams.insert(id, Stream { token, tx, task });
    }

    /// An unsigned frame for a stream (data, window or close): passed on if its token
    /// matches, dropped otherwise.
    pub(crate) fn down(&mut self, route: &str, body: &[u8]) {
        let decoded = match route {
            tunnel::DATA => payload::from_bus::<tunnel::Data>(body)
                .map(|d| (d.stream, d.token.clone(), Down::Data(d))),
            tunnel::WINDOW => payload::from_bus::<tunnel::Window>(body)
                .map(|w| (w.stream, w.token, Down::Window(w.grant))),
            tunnel::CLOSE => {
                payload::from_bus::<tunnel::Close>(body).map(|c| (c.stream, c.token, Down::Close))
            }
            _ => return,
        };
        let (id, token, frame) = match decoded {
            Ok(d) => d,
            Err(e) => {
                tracing::debug!(%route, error = %e, "Undecodable tunnel frame dropped.");
                return;
            }
        };
        let Some(stream) = self.streams.get(&id) else {
            return;
        };
        if !tunnel::token_eq(&stream.token, &token) {
            tracing::warn!(stream = id, %route, "Tunnel frame with a wrong token dropped.");
            return;
        }
        // After a close the task ends by itself (flushing what it has) and reports
        // `Ended`; until then late frames go nowhere.
        let _ = stream.tx.send(frame);
    }

    /// A stream task ended.
    pub(crate) fn ended(&mut self, id: u64) {
        self.streams.remove(&id);
    }
}

fn encode<T: serde::Serialize>(body: &T) -> Option<Vec<u8>> {
    payload::to_bus(body)
        .map_err(|e| tracing::error!(error = %e, "Cannot encode a tunnel frame."))
        .ok()
}

fn send(up: &mpsc::UnboundedSender<Up>, route: &'static str, body: Option<Vec<u8>>) {
    if let Some(body) = body {
        let _ = up.send(Up::Frame { route, body });
    }
}

fn send_close(
    up: &mpsc::UnboundedSender<Up>,
    stream: u64,
    token: &[u8],
    reason: CloseReason,
    detail: String,
) {
    let close = tunnel::Close {
        stream,
        token: token.to_vec(),
        reason,
        detail,
    };
    send(up, tunnel::CLOSE, encode(&close));
}

/// Dials, then carries bytes both ways within the windows until either end closes, the
/// stream idles out or the peer breaks the protocol.
async fn run_stream(
    open: tunnel::Open,
    mut rx: mpsc::UnboundedReceiver<Down>,
    up: mpsc::UnboundedSender<Up>,
) {
    let (id, token) = (open.stream, open.token.clone());
    let outcome = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&open.remote)).await {
        Err(_) => Some((CloseReason::DialFailed, "dial timed out".to_owned())),
        Ok(Err(e)) => Some((CloseReason::DialFailed, format!("dial: {e}"))),
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            let opened = tunnel::Opened {
                stream: id,
                token: token.clone(),
                window: tunnel::DEFAULT_WINDOW,
            };
            send(&up, tunnel::OPENED, encode(&opened));
            pump(&open, tcp, &mut rx, &up).await
        }
    };
    match &outcome {
        Some((reason, detail)) => {
            tracing::info!(stream = id, reason = reason.as_str(), %detail, "Tunnel closed.");
            send_close(&up, id, &token, *reason, detail.clone());
        }
        None => tracing::info!(stream = id, "Tunnel closed by the scheduler."),
    }
    let _ = up.send(Up::Ended(id));
}

/// The stream's life after the dial: `None` when the scheduler closed it (nothing to send
/// back), else why this end closed it.
async fn pump(
    open: &tunnel::Open,
    tcp: TcpStream,
    rx: &mut mpsc::UnboundedReceiver<Down>,
    up: &mpsc::UnboundedSender<Up>,
) -> Option<(CloseReason, String)> {
    let (mut rd, mut wr) = tcp.into_split();
    let mut credit = Credit::new(open.window);
    let mut window = Receive::new(tunnel::DEFAULT_WINDOW);
    let (mut seq_up, mut seq_down) = (0u64, 0u64);
    let mut buf = vec![0u8; tunnel::MAX_CHUNK];
    let idle = Duration::from_millis(open.idle_timeout_ms).max(MIN_IDLE);
    let mut deadline = Instant::now() + idle;
    loop {
        let room = usize::try_from(credit.available())
            .unwrap_or(usize::MAX)
            .min(buf.len());
        tokio::select! {
            read = rd.read(&mut buf[..room]), if room > 0 => match read {
                Ok(0) => return Some((CloseReason::Closed, "remote closed".into())),
                Ok(n) => {
                    let n = credit.take(n);
                    let data = tunnel::Data {
                        stream: open.stream,
                        token: open.token.clone(),
                        seq: seq_up,
                        data: buf[..n].to_vec(),
                    };
                    seq_up += 1;
                    send(up, tunnel::DATA, encode(&data));
                    deadline = Instant::now() + idle;
                }
                Err(e) => return Some((CloseReason::Reset, format!("read: {e}"))),
            },
            frame = rx.recv() => match frame {
                Some(Down::Data(d)) => {
                    if d.seq != seq_down {
                        return Some((CloseReason::Reset, format!("chunk {} where {seq_down} was due", d.seq)));
                    }
                    seq_down += 1;
                    if let Err(e) = window.arrived(d.data.len()) {
                        return Some((CloseReason::Reset, e.to_string()));
                    }
                    // A remote that does not read holds this write, and with it the grants:
                    // the scheduler stops sending, and only this stream waits.
                    if let Err(e) = wr.write_all(&d.data).await {
                        return Some((CloseReason::Reset, format!("write: {e}")));
                    }
                    if let Some(grant) = window.delivered(d.data.len()) {
                        let w = tunnel::Window { stream: open.stream, token: open.token.clone(), grant };
                        send(up, tunnel::WINDOW, encode(&w));
                    }
                    deadline = Instant::now() + idle;
                }
                Some(Down::Window(grant)) => {
                    if let Err(e) = credit.grant(grant) {
                        return Some((CloseReason::Reset, e.to_string()));
                    }
                }
                Some(Down::Close) | None => {
                    let _ = wr.shutdown().await;
                    return None;
                }
            },
            () = tokio::time::sleep_until(deadline) => {
                return Some((CloseReason::Idle, format!("no data for {} ms", idle.as_millis())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn open(stream: u64, remote: &str) -> tunnel::Open {
        tunnel::Open {
            stream,
            token: vec![9; tunnel::TOKEN_LEN],
            remote: remote.into(),
            window: tunnel::DEFAULT_WINDOW,
            idle_timeout_ms: 60_000,
            actor: "ops".into(),
        }
    }

    fn close_reason(up: Up) -> CloseReason {
        match up {
            Up::Frame { route, body } if route == tunnel::CLOSE => {
                payload::from_bus::<tunnel::Close>(&body).unwrap().reason
            }
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn opens_off_the_allowlist_or_over_the_cap_are_refused_with_a_close() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let allowed = listener.local_addr().unwrap().to_string();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tunnels = Tunnels::new(vec![allowed.clone()], 1, tx);
        tunnels.open(open(1, "127.0.0.1:1"));
        assert_eq!(
            close_reason(rx.recv().await.unwrap()),
            CloseReason::NotAllowed
        );
        assert!(tunnels.is_empty());

        tunnels.open(open(2, &allowed));
        let _accepted = listener.accept().await.unwrap();
        match rx.recv().await.unwrap() {
            Up::Frame { route, .. } => assert_eq!(route, tunnel::OPENED),
            other => panic!("{other:?}"),
        }
        tunnels.open(open(3, &allowed));
        assert_eq!(close_reason(rx.recv().await.unwrap()), CloseReason::TooMany);

        // A close with the wrong token is ignored; with the right one the stream ends.
        let close = |token: Vec<u8>| {
            payload::to_bus(&tunnel::Close {
                stream: 2,
                token,
                reason: CloseReason::Closed,
                detail: String::new(),
            })
            .unwrap()
        };
        tunnels.down(tunnel::CLOSE, &close(vec![1; tunnel::TOKEN_LEN]));
        assert_eq!(tunnels.len(), 1);
        tunnels.down(tunnel::CLOSE, &close(vec![9; tunnel::TOKEN_LEN]));
        match tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Up::Ended(2) => tunnels.ended(2),
            other => panic!("{other:?}"),
        }
        assert!(tunnels.is_empty());
    }
}
