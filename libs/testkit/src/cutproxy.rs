//! A TCP proxy that can cut the path it carries the way a network partition does: while
//! cut, no byte crosses in either direction (what arrives is read and dropped), nobody gets
//! a FIN or an RST, and new connections are accepted and held silent, so each side can only
//! notice by its own keepalives. A heal closes every connection that lived through the cut
//! (their peers gave up on them) and forwards new ones again. The same tool as
//! `loadtest/scenarios/faults/cutproxy.py`, for tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// How often a held or forwarding connection looks at the cut and heal state.
const CHECK: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct State {
    cut: AtomicBool,
    /// Bumped by every heal: connections from an earlier epoch that saw a cut close.
    epoch: AtomicU64,
}

/// A running proxy; dropping it stops accepting (live connections end at the next heal or
/// when a side closes).
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let accept = tokio::spawn({
            let state = Arc::clone(&state);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(carry(client, target, Arc::clone(&state)));
                }
            }
        });
        Ok(CutProxy {
            addr,
            state,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts the path: from now on nothing crosses.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    /// Heals it: connections that lived through the cut are closed, new ones forwarded.
    pub fn heal(&self) {
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn carry(client: TcpStream, target: SocketAddr, state: Arc<State>) {
    let epoch = state.epoch.load(Ordering::SeqCst);
    if state.cut.load(Ordering::SeqCst) {
        // Made during the cut: held silent, closed at the heal.
        while state.epoch.load(Ordering::SeqCst) == epoch {
            tokio::time::sleep(CHECK).await;
        }
        return;
    }
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_r, client_w) = client.into_split();
    let (up_r, up_w) = upstream.into_split();
    let up = tokio::spawn(pump(client_r, up_w, Arc::clone(&state), epoch));
    pump(up_r, client_w, state, epoch).await;
    up.abort();
}

/// Copies `from` to `to` until either side closes, dropping what arrives while cut, and
/// ends when a heal follows a cut this connection lived through.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: Arc<State>, epoch: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if state.epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        let n = match tokio::time::timeout(CHECK, from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if !state.cut.load(Ordering::SeqCst) && to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
