//! The interest link: one NATS connection of the gateway's own that carries every user,
//! agent and room subscription of the replica, speaking the core client protocol (`SUB`,
//! `UNSUB`, `PING`/`PONG`, `MSG`/`HMSG`) directly.
//!
//! Why not async-nats for these: every `Client::subscribe` there allocates a tokio mpsc
//! channel whose first block holds 32 `Message`s (~184 bytes each), about 5.9 KB per
//! subscription before a message arrives, and one per connected user dominated the
//! gateway's idle memory (docs/adr/0013). Here a subscription is a map entry (its sid and
//! what it is for); every message of the link is read by one task and handed to one
//! handler, which the hub installs.
//!
//! The delivery guarantee of docs/protocol.md 7.1 rests on confirmation: a subscription is
//! live once a `PING` written after its `SUB` has been answered, because a server handles
//! one client's operations in order. Every subscription gets a ticket (a number); each
//! `PING` covers every ticket handed out before it was written, so an accept storm shares
//! round trips instead of paying one each. After a reconnect every subscription is sent
//! again and one `PING` covering every ticket so far follows.
//!
//! The replica's fixed subjects (directed pushes, broadcast, control) are on the link too:
//! one connection keeps the server's order between a control message and the pushes
//! after it. Publishing stays on async-nats (`bus.rs`); the link only reads. Plain TCP only: a NATS
//! setting that requires TLS is refused by the link, which then never confirms (the
//! replica stays not ready and says why).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::{Buf, Bytes, BytesMut};
use messages::{RoomId, UserId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};

/// How long connecting (TCP, `INFO`, `CONNECT` answered) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest protocol line accepted from the server (an `INFO` with a long server list).
const MAX_LINE: usize = 64 * 1024;
/// Largest message body accepted; NATS' own maximum payload is far below.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Pause between connection attempts, doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How often an otherwise quiet link pings its server.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// A `PING` unanswered this long means the connection is dead (a half-open TCP
/// connection, a stalled server, a partition): the link reconnects, and the replica is not
/// ready meanwhile (after `bus_loss_shed` its clients go elsewhere).
const STALE_AFTER: Duration = Duration::from_secs(10);

/// Where in the server list the link starts: at random, as async-nats does for the
/// replica's other connection. Starting every replica at the first URL put every link of
/// the tier on one node, so losing that node cut every replica's subscriptions at once
/// (docs/reliability.md, "NATS node loss during a broadcast").
fn first_server(servers: usize) -> usize {
    if servers > 1 {
        rand::random_range(0..servers)
    } else {
        0
    }
}

/// Our `PING`s in flight, in the order written: the ticket each covers, and when.
type Pings = Mutex<VecDeque<(u64, std::time::Instant)>>;

fn lock_pings(pings: &Pings) -> MutexGuard<'_, VecDeque<(u64, std::time::Instant)>> {
    pings
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a subscription of the link is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interest {
    /// `ws.user.<user>`: an app user with local sockets.
    User(UserId),
    /// `ws.agent.<node>`: an agent node with local sockets.
    Agent(UserId),
    /// `ws.room.<room>`: a room with local members.
    Room(RoomId),
    /// One of the replica's fixed subjects, held for the replica's lifetime. They share
    /// the link with user and room interest so that everything the bus sends this replica
    /// arrives on one connection, in the order the server sent it (a service's join
    /// control and its next room push, say).
    Fixed(Fixed, String),
}

/// The replica's fixed subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    /// `ws.gw.<me>.push`: socket ids in the `ws-socket` header.
    Sockets,
    /// `ws.all`: every app socket.
    Broadcast,
    /// `ws.gw.<me>.ctl` and `ws.ctl`.
    Control,
}

impl Fixed {
    /// The fixed interests of replica `me`.
    pub fn all(me: &messages::GatewayId) -> [Interest; 4] {
        use messages::subject;
        [
            Interest::Fixed(Fixed::Sockets, subject::gateway_push(me)),
            Interest::Fixed(Fixed::Broadcast, subject::broadcast().to_owned()),
            Interest::Fixed(Fixed::Control, subject::gateway_control(me)),
            Interest::Fixed(Fixed::Control, subject::control_all().to_owned()),
        ]
    }
}

impl Interest {
    /// The subject this interest subscribes to.
    pub fn subject(&self) -> String {
        match self {
            Interest::User(user) => messages::subject::user(user),
            Interest::Agent(node) => messages::subject::agent(node),
            Interest::Room(room) => messages::subject::room(room),
            Interest::Fixed(_, subject) => subject.clone(),
        }
    }
}

/// One message as the bus delivered it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The subject it was published to.
    pub subject: String,
    /// Its headers, if any.
    pub headers: Option<HeaderMap>,
    /// Its body.
    pub payload: Bytes,
}

/// Receives every message of the link with the interest it was subscribed for.
pub(crate) type Handler = Arc<dyn Fn(&Interest, Delivery) + Send + Sync>;

/// Where and as whom the link connects.
#[derive(Clone)]
pub struct LinkTarget {
    /// `host:port` of each server, tried in turn.
    pub servers: Vec<(String, u16, bool)>,
    /// User and password, if any.
    pub user_password: Option<(String, String)>,
    /// Token, if any.
    pub token: Option<String>,
    /// Client name shown by the server.
    pub name: String,
}

impl std::fmt::Debug for LinkTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkTarget")
            .field("servers", &self.servers)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl LinkTarget {
    /// From the service's parsed NATS setting.
    pub fn new(target: &servicekit::nats::NatsTarget, name: String) -> Self {
        LinkTarget {
            servers: target
                .servers()
                .iter()
                .map(|s| (s.host().to_owned(), s.port(), s.tls_required()))
                .collect(),
            user_password: target
                .user_password()
                .map(|(u, p)| (u.to_owned(), p.to_owned())),
            token: target.token().map(str::to_owned),
            name,
        }
    }

    fn connect_line(&self) -> String {
        let mut options = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "headers": true,
            "no_responders": false,
            "lang": "rust-ws-gateway-link",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "name": self.name,
        });
        if let Some((user, pass)) = &self.user_password {
            options["user"] = user.as_str().into();
            options["pass"] = pass.as_str().into();
        }
        if let Some(token) = &self.token {
            options["auth_token"] = token.as_str().into();
        }
        format!("CONNECT {options}\r\nPING\r\n")
    }
}

#[derive(Debug, Default)]
struct State {
    /// Every live subscription by sid: what is sent again after a reconnect.
    subs: HashMap<u64, Interest>,
    /// Protocol operations waiting for the writer.
    out: BytesMut,
    next_sid: u64,
    /// A connection is established (operations go to `out`, else only to `subs`).
    connected: bool,
    /// Subscriptions the server refused (`-ERR` permissions violation): never live.
    refused: std::collections::HashSet<u64>,
}

/// The link's shared state; see the module documentation.
pub struct Link {
    state: Mutex<State>,
    wake: Notify,
    /// Highest ticket handed out.
    requested: AtomicU64,
    /// Highest ticket a `PONG` has confirmed.
    confirmed: watch::Sender<u64>,
    up: AtomicBool,
    handler: OnceLock<Handler>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("up", &self.up())
            .field("confirmed", &*self.confirmed.borrow())
            .finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A subscription of the link; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    sid: u64,
    ticket: u64,
    link: Option<Arc<Link>>,
}

impl Subscription {
    /// A subscription that owns nothing and is live at once (tests).
    pub fn none() -> Self {
        Subscription {
            sid: 0,
            ticket: 0,
            link: None,
        }
    }

    /// Waits until the server has confirmed this subscription. False when `timeout`
    /// passed first: the caller must not promise delivery then.
    pub fn live(&self) -> Live {
        Live {
            ticket: self.ticket,
            sid: self.sid,
            link: self.link.clone(),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(link) = self.link.take() {
            link.unsubscribe(self.sid);
        }
    }
}

/// A subscription's confirmation, to wait for without holding the subscription.
#[derive(Debug)]
pub struct Live {
    ticket: u64,
    sid: u64,
    link: Option<Arc<Link>>,
}

impl Live {
    /// True once the subscription is confirmed; false if `timeout` passed first or the
    /// server refused it (a refusal arrives before the `PONG` that confirms).
    pub async fn wait(self, timeout: Duration) -> bool {
        let Some(link) = self.link else {
            return true;
        };
        let mut confirmed = link.confirmed.subscribe();
        let ticket = self.ticket;
        let done = matches!(
            tokio::time::timeout(timeout, confirmed.wait_for(|c| *c >= ticket)).await,
            Ok(Ok(_))
        );
        done && !lock(&link.state).refused.contains(&self.sid)
    }
}

impl Link {
    /// A link with no connection yet; [`Link::run`] connects it.
    pub fn new() -> Arc<Self> {
        Arc::new(Link {
            state: Mutex::new(State {
                next_sid: 1,
                ..State::default()
            }),
            wake: Notify::new(),
            requested: AtomicU64::new(0),
            confirmed: watch::channel(0).0,
            up: AtomicBool::new(false),
            handler: OnceLock::new(),
        })
    }

    /// Installs the handler every message goes to (once; later calls are ignored).
    pub fn set_handler(&self, handler: Handler) {
        let _ = self.handler.set(handler);
    }

    /// Whether the link is connected and has confirmed everything it had subscribed.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Subscribes for `interest`; the subscription lasts as long as the returned handle.
    pub fn subscribe(self: &Arc<Self>, interest: Interest) -> Subscription {
        let mut state = lock(&self.state);
        let sid = state.next_sid;
        state.next_sid += 1;
        if state.connected {
            let line = format!("SUB {} {sid}\r\n", interest.subject());
            state.out.extend_from_slice(line.as_bytes());
        }
        state.subs.insert(sid, interest);
        // Taken under the lock, after the SUB is queued: a PING the writer sends after
        // seeing this ticket follows the SUB (or the resubscription that includes it).
        let ticket = self.requested.fetch_add(1, Ordering::SeqCst) + 1;
        drop(state);
        self.wake.notify_one();
        Subscription {
            sid,
            ticket,
            link: Some(Arc::clone(self)),
        }
    }

    fn unsubscribe(&self, sid: u64) {
        let mut state = lock(&self.state);
        state.refused.remove(&sid);
        if state.subs.remove(&sid).is_some() && state.connected {
            let line = format!("UNSUB {sid}\r\n");
            state.out.extend_from_slice(line.as_bytes());
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Subscriptions held (tests, diagnostics).
    pub fn len(&self) -> usize {
        lock(&self.state).subs.len()
    }

    /// Whether the link holds no subscription.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Confirms every ticket handed out so far without a server (tests of the hub).
    #[cfg(test)]
    pub fn confirm_all(&self) {
        let wanted = self.requested.load(Ordering::SeqCst);
        self.confirmed.send_modify(|c| *c = (*c).max(wanted));
    }

    /// Protocol operations queued for the writer (tests).
    #[cfg(test)]
    pub fn queued(&self) -> String {
        String::from_utf8_lossy(&lock(&self.state).out).into_owned()
    }

    /// Pretends a connection is up, so operations are queued (tests).
    #[cfg(test)]
    pub fn set_connected(&self) {
        lock(&self.state).connected = true;
    }

    /// Keeps the link connected to one of `target`'s servers, forever.
    pub async fn run(self: Arc<Self>, target: LinkTarget) {
        let mut backoff = FIRST_BACKOFF;
        let mut next = first_server(target.servers.len());
        let mut warned = false;
        loop {
            let Some((host, port, tls)) = target.servers.get(next % target.servers.len().max(1))
            else {
                tracing::error!("Interest link has no NATS server to connect to.");
                return;
            };
            next = next.wrapping_add(1);
            let result = if *tls {
                Err(LinkError::Tls)
            } else {
                self.session(host, *port, &target).await
            };
            match result {
                Ok(()) => {
                    backoff = FIRST_BACKOFF;
                    warned = false;
                    tracing::warn!(%host, port, "Interest link lost its NATS connection; reconnecting.");
                }
                Err(e) => {
                    if warned {
                        tracing::debug!(%host, port, error = %e, "Interest link not connected.");
                    } else {
                        warned = true;
                        tracing::warn!(%host, port, error = %e, "Interest link not connected.");
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection: handshake, resubscribe, then read and write until it fails.
    /// `Ok` means it was established and later lost.
    async fn session(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        target: &LinkTarget,
    ) -> Result<(), LinkError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
            .await
            .map_err(|_| LinkError::Timeout)??;
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let mut buf = BytesMut::new();
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let info = read_line(&mut read, &mut buf).await?;
            if info.starts_with(b"INFO ") && tls_required(&info) {
                return Err(LinkError::Tls);
            }
            write.write_all(target.connect_line().as_bytes()).await?;
            // `verbose` is off: the answer to our PING is PONG, or -ERR if refused.
            loop {
                let line = read_line(&mut read, &mut buf).await?;
                match line.as_slice() {
                    b"PONG" => return Ok(()),
                    b"PING" => write.write_all(b"PONG\r\n").await?,
                    l if l.starts_with(b"-ERR") => {
                        return Err(LinkError::Refused(String::from_utf8_lossy(l).into_owned()));
                    }
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| LinkError::Timeout)??;

        let pings: Arc<Pings> = Arc::new(Mutex::new(VecDeque::new()));
        {
            let mut state = lock(&self.state);
            let state = &mut *state;
            state.connected = true;
            // Everything queued for the old connection is superseded by the full list.
            state.out.clear();
            for (sid, interest) in &state.subs {
                let line = format!("SUB {} {sid}\r\n", interest.subject());
                state.out.extend_from_slice(line.as_bytes());
            }
        }
        let writer = tokio::spawn(writer(Arc::clone(self), write, Arc::clone(&pings)));
        // A PING covering every ticket so far goes out even if none is new.
        self.wake.notify_one();
        let read_result = self.reader(read, buf, &pings).await;
        writer.abort();
        {
            let mut state = lock(&self.state);
            state.connected = false;
            state.out.clear();
        }
        self.up.store(false, Ordering::Release);
        match read_result {
            Err(LinkError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "Interest link connection ended.");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    async fn reader<R: tokio::io::AsyncRead + Unpin>(
        &self,
        mut read: R,
        mut buf: BytesMut,
        pings: &Pings,
    ) -> Result<(), LinkError> {
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.reset();
        loop {
            loop {
                match parse(&mut buf)? {
                    None => break,
                    Some(op) => self.on_op(op, pings),
                }
            }
            if buf.capacity() - buf.len() < 4096 {
                buf.reserve(16 * 1024);
            }
            tokio::select! {
                // `read_buf` is cancel safe: nothing read is lost when the tick wins.
                n = read.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                    }
                }
                _ = keepalive.tick() => self.keepalive(pings)?,
            }
        }
    }

    /// Fails when a `PING` has gone unanswered too long; otherwise queues one more, which
    /// confirms nothing new (under the state lock, so `pings` keeps the written order).
    fn keepalive(&self, pings: &Pings) -> Result<(), LinkError> {
        let now = std::time::Instant::now();
        let mut state = lock(&self.state);
        let mut pings = lock_pings(pings);
        if pings
            .front()
            .is_some_and(|(_, at)| now.saturating_duration_since(*at) > STALE_AFTER)
        {
            return Err(LinkError::Stale);
        }
        state.out.extend_from_slice(b"PING\r\n");
        pings.push_back((*self.confirmed.borrow(), now));
        drop(pings);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// A refused subscription (`-ERR 'Permissions Violation for Subscription to "<subject>"'`)
    /// is marked so that waiting for it fails: the server sends the error before the `PONG`
    /// that would otherwise confirm it.
    fn refused(&self, error: &str) {
        let Some(subject) = error
            .split_once("Subscription to \"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(subject, _)| subject)
        else {
            return;
        };
        let mut state = lock(&self.state);
        let state = &mut *state;
        for (sid, interest) in &state.subs {
            if interest.subject() == subject {
                state.refused.insert(*sid);
            }
        }
    }

    fn on_op(&self, op: Op, pings: &Pings) {
        match op {
            Op::Msg { sid, delivery } => {
                let interest = lock(&self.state).subs.get(&sid).cloned();
                if let (Some(interest), Some(handler)) = (interest, self.handler.get()) {
                    handler(&interest, delivery);
                }
            }
            Op::Ping => {
                lock(&self.state).out.extend_from_slice(b"PONG\r\n");
                self.wake.notify_one();
            }
            Op::Pong => {
                let seq = lock_pings(pings).pop_front();
                if let Some((seq, _)) = seq {
                    self.confirmed.send_if_modified(|c| {
                        let newer = seq > *c;
                        if newer {
                            *c = seq;
                        }
                        newer
                    });
                    self.up.store(true, Ordering::Release);
                }
            }
            Op::Err(e) => {
                tracing::warn!(error = %e, "NATS refused an operation of the interest link.");
                self.refused(&e);
            }
            Op::Other => {}
        }
    }
}

/// Writes what is queued, each time followed by a `PING` if a ticket is not yet covered.
async fn writer(link: Arc<Link>, mut write: tokio::net::tcp::OwnedWriteHalf, pings: Arc<Pings>) {
    // Tickets of an earlier connection are covered again by this connection's first PING.
    let mut pinged = None::<u64>;
    loop {
        link.wake.notified().await;
        let mut batch = {
            let mut state = lock(&link.state);
            let wanted = link.requested.load(Ordering::SeqCst);
            let mut batch = std::mem::take(&mut state.out);
            if pinged.is_none_or(|p| wanted > p) {
                lock_pings(&pings).push_back((wanted, std::time::Instant::now()));
                pinged = Some(wanted);
                batch.extend_from_slice(b"PING\r\n");
            }
            batch
        };
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = write.write_all_buf(&mut batch).await {
            tracing::debug!(error = %e, "Interest link write failed.");
            return;
        }
    }
}

/// Why a link connection failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Connecting took too long.
    #[error("timed out")]
    Timeout,
    /// The server requires TLS, which the link does not speak.
    #[error("the NATS server requires TLS; the interest link speaks plain TCP only")]
    Tls,
    /// The server refused the connection (credentials).
    #[error("refused: {0}")]
    Refused(String),
    /// A `PING` went unanswered for too long.
    #[error("the server stopped answering pings")]
    Stale,
    /// The server sent something that is not the protocol.
    #[error("protocol: {0}")]
    Protocol(&'static str),
}

async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    read: &mut R,
    _buf: &mut BytesMut,
) -> Result<Vec<u8>, LinkError> {
    let mut line = Vec::new();
    let n = (&mut *read)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        return Err(LinkError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        line.pop();
    }
    Ok(line)
}

fn tls_required(info: &[u8]) -> bool {
    info.get(5..)
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(json).ok())
        .is_some_and(|v| v["tls_required"] == true)
}

/// One server operation.
#[derive(Debug)]
enum Op {
    Msg { sid: u64, delivery: Delivery },
    Ping,
    Pong,
    Err(String),
    Other,
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

fn number(token: Option<&str>) -> Result<usize, LinkError> {
    token
        .and_then(|t| t.parse().ok())
        .ok_or(LinkError::Protocol("bad number in a message line"))
}

/// Takes one complete operation off the front of `buf`; `None` until one is complete.
fn parse(buf: &mut BytesMut) -> Result<Option<Op>, LinkError> {
    let Some(eol) = find_crlf(buf) else {
        if buf.len() > MAX_LINE {
            return Err(LinkError::Protocol("protocol line too long"));
        }
        return Ok(None);
    };
    let line =
        std::str::from_utf8(&buf[..eol]).map_err(|_| LinkError::Protocol("line not UTF-8"))?;
    let mut tokens = line.split_ascii_whitespace();
    let verb = tokens.next().unwrap_or("").to_ascii_uppercase();
    let op = match verb.as_str() {
        "MSG" | "HMSG" => {
            let args: Vec<&str> = tokens.collect();
            let headers = verb == "HMSG";
            // MSG <subject> <sid> [reply] <size>; HMSG <subject> <sid> [reply] <hdr> <total>
            let fixed = if headers { 4 } else { 3 };
            if args.len() != fixed && args.len() != fixed + 1 {
                return Err(LinkError::Protocol("bad message line"));
            }
            let subject = args[0].to_owned();
            let sid = number(args.get(1).copied())? as u64;
            let total = number(args.last().copied())?;
            let header_len = if headers {
                number(args.get(args.len() - 2).copied())?
            } else {
                0
            };
            if total > MAX_MESSAGE || header_len > total {
                return Err(LinkError::Protocol("bad message size"));
            }
            if buf.len() < eol + 2 + total + 2 {
                buf.reserve(eol + 2 + total + 2 - buf.len());
                return Ok(None);
            }
            buf.advance(eol + 2);
            let mut body = buf.split_to(total).freeze();
            buf.advance(2);
            let headers = if headers {
                let block = body.split_to(header_len);
                Some(parse_headers(&block)?)
            } else {
                None
            };
            return Ok(Some(Op::Msg {
                sid,
                delivery: Delivery {
                    subject,
                    headers,
                    payload: body,
                },
            }));
        }
        "PING" => Op::Ping,
        "PONG" => Op::Pong,
        "-ERR" => Op::Err(line.to_owned()),
        _ => Op::Other,
    };
    buf.advance(eol + 2);
    Ok(Some(op))
}

/// `NATS/1.0[ status]\r\nName: value\r\n...\r\n\r\n`
fn parse_headers(block: &[u8]) -> Result<HeaderMap, LinkError> {
    let text = std::str::from_utf8(block).map_err(|_| LinkError::Protocol("headers not UTF-8"))?;
    let mut lines = text.split("\r\n");
    if !lines.next().is_some_and(|l| l.starts_with("NATS/")) {
        return Err(LinkError::Protocol("headers without a version line"));
    }
    let mut map = HeaderMap::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(LinkError::Protocol("header line without a colon"));
        };
        map.append(name.trim(), value.trim());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn links_start_anywhere_in_the_server_list() {
        assert_eq!(first_server(0), 0);
        assert_eq!(first_server(1), 0);
        let mut seen = [0u32; 3];
        for _ in 0..300 {
            seen[first_server(3)] += 1;
        }
        // Each start has probability 1/3; missing one in 300 draws is a (2/3)^300 event.
        assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    }

    #[test]
    fn parses_messages_with_and_without_headers_across_reads() {
        let hdr = format!("NATS/1.0\r\n{}: 7\r\n\r\n", messages::headers::MSG_ID);
        let (a, r) = (user("a").subject(), room("r").subject());
        let wire = format!(
            "PING\r\nMSG {a} 3 5\r\nhello\r\nHMSG {r} 9 _INBOX.x {} {}\r\n{hdr}body\r\n",
            hdr.len(),
            hdr.len() + 4
        );
        let mut buf = BytesMut::new();
        let mut ops = vec![];
        // Fed one byte at a time: nothing is taken before it is complete.
        for b in wire.as_bytes() {
            buf.extend_from_slice(&[*b]);
            while let Some(op) = parse(&mut buf).unwrap() {
                ops.push(op);
            }
        }
        assert!(buf.is_empty());
        assert!(matches!(ops[0], Op::Ping));
        let Op::Msg { sid, delivery } = &ops[1] else {
            panic!("{ops:?}")
        };
        assert_eq!((*sid, &delivery.payload[..]), (3, &b"hello"[..]));
        assert!(delivery.headers.is_none());
        let Op::Msg { sid, delivery } = &ops[2] else {
            panic!("{ops:?}")
        };
        assert_eq!((*sid, delivery.subject.as_str()), (9, r.as_str()));
        assert_eq!(&delivery.payload[..], b"body");
        let map = delivery.headers.as_ref().unwrap();
        assert_eq!(
            map.get(messages::headers::MSG_ID).map(|v| v.as_str()),
            Some("7")
        );
    }

    #[test]
    fn a_broken_message_line_is_an_error_not_a_panic() {
        for wire in ["MSG a\r\n", "MSG a b 3\r\nabc\r\n", "HMSG a 1 9 3\r\n"] {
            let mut buf = BytesMut::from(wire);
            assert!(parse(&mut buf).is_err(), "{wire}");
        }
    }

    fn user(s: &str) -> Interest {
        Interest::User(UserId::new(s).unwrap())
    }

    fn room(s: &str) -> Interest {
        Interest::Room(RoomId::new(s).unwrap())
    }

    #[tokio::test]
    async fn a_subscription_is_live_only_after_a_pong_that_follows_its_sub() {
        // A fake NATS server on a local socket: the link's first PING after the SUB is
        // answered only when the test says so.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let link = Link::new();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        link.set_handler(Arc::new(move |interest: &Interest, d: Delivery| {
            sink.lock().unwrap().push((interest.clone(), d.payload));
        }));
        let early = link.subscribe(user("early"));
        let target = LinkTarget {
            servers: vec![("127.0.0.1".into(), port, false)],
            user_password: Some(("gw".into(), "pw".into())),
            token: None,
            name: "test".into(),
        };
        tokio::spawn(Arc::clone(&link).run(target));
        let (mut sock, _) = listener.accept().await.unwrap();
        sock.write_all(b"INFO {\"server_id\":\"x\"}\r\n")
            .await
            .unwrap();
        let mut server = BufReader::new(sock);
        let connect = read_line(&mut server, &mut BytesMut::new()).await.unwrap();
        assert!(String::from_utf8_lossy(&connect).contains("\"user\":\"gw\""));
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            b"PING"
        );
        server.get_mut().write_all(b"PONG\r\n").await.unwrap();
        // The subscription made before the connection is sent on connecting, then a PING.
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            format!("SUB {} 1", user("early").subject()).as_bytes()
        );
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            b"PING"
        );
        assert!(
            !early.live().wait(Duration::from_millis(50)).await,
            "no PONG yet"
        );
        server.get_mut().write_all(b"PONG\r\n").await.unwrap();
        assert!(early.live().wait(Duration::from_secs(2)).await);
        let late = link.subscribe(user("late"));
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            format!("SUB {} 2", user("late").subject()).as_bytes()
        );
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            b"PING"
        );
        assert!(!late.live().wait(Duration::from_millis(50)).await);
        server
            .get_mut()
            .write_all(format!("PONG\r\nMSG {} 2 2\r\nhi\r\n", user("late").subject()).as_bytes())
            .await
            .unwrap();
        assert!(late.live().wait(Duration::from_secs(2)).await);
        drop(early);
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            b"UNSUB 1"
        );
        assert_eq!(
            got.lock().unwrap().as_slice(),
            &[(user("late"), Bytes::from_static(b"hi"))]
        );
        // A subscription the server refuses is never live, although a PONG follows.
        let denied = link.subscribe(user("denied"));
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            format!("SUB {} 3", user("denied").subject()).as_bytes()
        );
        assert_eq!(
            read_line(&mut server, &mut BytesMut::new()).await.unwrap(),
            b"PING"
        );
        let refusal = format!(
            "-ERR 'Permissions Violation for Subscription to \"{}\"'\r\nPONG\r\n",
            user("denied").subject()
        );
        server
            .get_mut()
            .write_all(refusal.as_bytes())
            .await
            .unwrap();
        assert!(!denied.live().wait(Duration::from_secs(1)).await);
        assert!(
            late.live().wait(Duration::from_millis(10)).await,
            "others unaffected"
        );
    }
}
