//! A TCP proxy for fault injection in process tests: put it between a client and a server,
//! then switch its [`Mode`] while traffic flows.
//!
//! ```text
//!  client ──▶ FaultProxy (127.0.0.1:ephemeral) ──▶ upstream server
//!             │ one task per connection, two pumps (client→upstream, upstream→client)
//!             │ every task watches one `watch::Sender<Mode>`, so a mode change reaches
//!             │ connections that are already open, not only new ones
//! ```
//!
//! Modes model what networks do to a long-lived gRPC stream: a slow link, a cut with
//! resets, a silent partition (packets vanish, nobody is told), and a one-sided close (a NAT,
//! proxy or sidecar forgets the flow: one end gets a reset, the other hears nothing).
//! docs/DESIGN.md §4 depends on the last one: a one-sided close must never shorten the fence.
//!
//! Dropping the proxy closes every connection it carries.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does to traffic. Applies to existing connections as well as new ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward every chunk, in both directions, after this delay.
    Delay(Duration),
    /// Reset every connection, both sides; new connections are reset on accept.
    Drop,
    /// Forward nothing, close nothing: connections are accepted and held open, and nothing
    /// moves in either direction (bytes wait in kernel buffers). Back to `Pass`, traffic
    /// resumes, as a healed partition would deliver retransmitted segments. New connections
    /// reach the upstream only once the mode forwards again.
    Blackhole,
    /// Reset the upstream (server) side of every connection; keep the client side open but
    /// silent. The server sees the stream end at once while the client sees nothing. When the
    /// mode changes again, the client side is reset too, as the server's stack would do to
    /// the client's next segment once the path heals. New connections are held like in
    /// [`Mode::Blackhole`]: there is no upstream side to reset yet.
    ResetUpstreamBlackholeDownstream,
    /// The mirror image: the client side is reset and the upstream side is held open but
    /// silent. New connections are reset on accept.
    ResetDownstreamBlackholeUpstream,
    /// Connects stall in the TCP handshake: existing connections are reset, the listen backlog
    /// is cut to one slot that a plug connection of the proxy's own fills, so the kernel drops
    /// every new SYN and clients retransmit it (after 1 s, 3 s, …). Back to another mode, the
    /// backlog is restored and the next retransmitted SYN connects — a request whose client
    /// waited that long is sent then. A path that stalls connects is what H3 of the safety
    /// review is about: a holder must not send a request whose connect outlived its fence.
    StallConnects,
}

impl Mode {
    /// The delay to apply before forwarding, or `None` when this mode forwards nothing.
    fn forwarding(&self) -> Option<Duration> {
        match self {
            Mode::Pass => Some(Duration::ZERO),
            Mode::Delay(d) => Some(*d),
            _ => None,
        }
    }

    /// Whether this mode tears an established connection down (fully or on one side).
    fn is_fault(&self) -> bool {
        matches!(
            self,
            Mode::Drop
                | Mode::ResetUpstreamBlackholeDownstream
                | Mode::ResetDownstreamBlackholeUpstream
                | Mode::StallConnects
        )
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    closed: AtomicU64,
    /// [`Mode::StallConnects`] is in force: the backlog is cut and plugged.
    stalled: std::sync::atomic::AtomicBool,
}

/// A running proxy. See the module docs.
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// Every connection task holds a receiver. Dropping the sender (with the proxy) wakes them
    /// all with an error, which they take as "shut down".
    mode: watch::Sender<Mode>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Binds 127.0.0.1 on an ephemeral port and starts forwarding to `upstream` in
    /// [`Mode::Pass`].
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        FaultProxy::start_on(std::net::Ipv4Addr::LOCALHOST, upstream).await
    }

    /// [`FaultProxy::start`] on another local address (the sandbox's WAN address with `--netns`).
    pub async fn start_on(ip: std::net::Ipv4Addr, upstream: SocketAddr) -> io::Result<FaultProxy> {
        FaultProxy::start_at(SocketAddr::from((ip, 0)), upstream).await
    }

    /// [`FaultProxy::start`] on exactly `at` (port 0: any).
    pub async fn start_at(at: SocketAddr, upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(at).await?;
        let addr = listener.local_addr()?;
        let (mode, rx) = watch::channel(Mode::Pass);
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(listener, addr, upstream, rx, counters.clone()));
        Ok(FaultProxy { addr, upstream, mode, counters, accept })
    }

    /// The address clients should dial instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server this proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Switches the mode for new and existing connections.
    pub fn set_mode(&self, mode: Mode) {
        tracing::debug!(proxy = %self.addr, upstream = %self.upstream, ?mode, "fault proxy mode");
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> Mode {
        self.mode.borrow().clone()
    }

    /// Connections accepted since start.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Whether new connects stall now ([`Mode::StallConnects`] took effect: set a moment after
    /// the mode, cleared when it ends).
    pub fn connects_stalled(&self) -> bool {
        self.counters.stalled.load(Ordering::Relaxed)
    }

    /// Connections currently open (accepted and not yet fully closed by the proxy).
    pub fn active(&self) -> u64 {
        self.accepted().saturating_sub(self.counters.closed.load(Ordering::Relaxed))
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // Connection tasks stop when `self.mode` drops right after this.
        self.accept.abort();
    }
}

/// The listen backlog outside [`Mode::StallConnects`].
const BACKLOG: i32 = 1024;

/// In [`Mode::StallConnects`]: cuts the backlog to one slot, fills it with a connection of our
/// own, and waits (accepting nothing) until the mode changes; then restores the backlog and
/// drops the plug. Linux updates the backlog of a listening socket on a second `listen`.
async fn stall_connects(
    listener: &TcpListener,
    addr: SocketAddr,
    mode: &mut watch::Receiver<Mode>,
    counters: &Counters,
) {
    let sock = socket2::SockRef::from(listener);
    if let Err(e) = sock.listen(0) {
        tracing::warn!(error = %e, "fault proxy: backlog not cut; connects will not stall");
    }
    // The handshake of the plug completes in the kernel; it then occupies the one slot.
    // Bounded: a connection already queued would leave the plug's own SYN dropped.
    let plug = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await.ok().and_then(Result::ok);
    let plug_addr = plug.as_ref().and_then(|p| p.local_addr().ok());
    counters.stalled.store(plug_addr.is_some(), Ordering::Relaxed);
    let _ = wait_for(mode, |m| *m != Mode::StallConnects).await;
    let _ = sock.listen(BACKLOG);
    counters.stalled.store(false, Ordering::Relaxed);
    if let Some(plug_addr) = plug_addr
        && let Ok((s, peer)) = listener.accept().await
    {
        // The accept queue is FIFO and the plug was queued first.
        debug_assert_eq!(peer, plug_addr);
        drop(s);
    }
    drop(plug);
}

async fn accept_loop(
    listener: TcpListener,
    addr: SocketAddr,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    counters: Arc<Counters>,
) {
    loop {
        if *mode.borrow_and_update() == Mode::StallConnects {
            stall_connects(&listener, addr, &mut mode, &counters).await;
            continue;
        }
        let (client, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "fault proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            r = mode.changed() => match r {
                Ok(()) => continue,
                Err(_) => return,
            },
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        let rx = mode.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            connection(client, upstream, rx).await;
            counters.closed.fetch_add(1, Ordering::Relaxed);
        });
    }
}

/// Closes with a RST rather than a FIN, so the peer gets an error now instead of a clean end
/// of stream — what a middlebox that forgets the flow produces.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Waits until `mode` satisfies `pred`, returning that mode, or `None` when the proxy is gone.
async fn wait_for(mode: &mut watch::Receiver<Mode>, pred: impl Fn(&Mode) -> bool) -> Option<Mode> {
    mode.wait_for(|m| pred(m)).await.ok().map(|m| m.clone())
}

/// Holds `s` open and silent until the mode changes away from `current`, then resets it.
async fn hold_then_reset(s: TcpStream, mode: &mut watch::Receiver<Mode>, current: Mode) {
    let _ = wait_for(mode, |m| *m != current).await;
    reset(s);
}

/// One proxied connection, from accept to close.
async fn connection(client: TcpStream, upstream_addr: SocketAddr, mut mode: watch::Receiver<Mode>) {
    // Before connecting upstream: a blackhole (of either kind towards the server) means the
    // SYN would never arrive, so wait; a reset towards the client ends it now.
    let Some(m) = wait_for(&mut mode, |m| {
        m.forwarding().is_some()
            || matches!(m, Mode::Drop | Mode::ResetDownstreamBlackholeUpstream | Mode::StallConnects)
    })
    .await
    else {
        return;
    };
    if m.forwarding().is_none() {
        reset(client);
        return;
    }
    let upstream = match TcpStream::connect(upstream_addr).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(upstream = %upstream_addr, error = %e, "fault proxy: upstream refused");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (mut client, mut upstream) = (client, upstream);

    // Run both pumps until they finish, or a fault mode arrives. The pumps borrow the
    // streams, so once the select ends we own them again and can close each side our way.
    let outcome = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let (down_mode, up_mode) = (mode.clone(), mode.clone());
        let pumps = async { tokio::try_join!(pump(cr, uw, down_mode), pump(ur, cw, up_mode)) };
        tokio::select! {
            r = pumps => Outcome::Done(r.is_ok()),
            m = wait_for(&mut mode, Mode::is_fault) => m.map_or(Outcome::Shutdown, Outcome::Fault),
        }
    };
    match outcome {
        Outcome::Done(true) => {} // both directions saw EOF and were half-closed in turn
        Outcome::Done(false) | Outcome::Shutdown | Outcome::Fault(Mode::Drop | Mode::StallConnects) => {
            reset(client);
            reset(upstream);
        }
        Outcome::Fault(m @ Mode::ResetUpstreamBlackholeDownstream) => {
            reset(upstream);
            hold_then_reset(client, &mut mode, m).await;
        }
        Outcome::Fault(m @ Mode::ResetDownstreamBlackholeUpstream) => {
            reset(client);
            hold_then_reset(upstream, &mut mode, m).await;
        }
        Outcome::Fault(_) => {} // unreachable: wait_for only returns fault modes
    }
}

enum Outcome {
    /// The pumps ended: `true` on EOF both ways, `false` on an I/O error.
    Done(bool),
    Fault(Mode),
    Shutdown,
}

/// Copies one direction. Reads only while the mode forwards, so a blackhole leaves bytes in
/// kernel buffers (and back-pressures the sender, as a real partition would) instead of
/// dropping them; a chunk already read when the mode changes is held until it forwards again.
async fn pump(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_for(&mut mode, |m| m.forwarding().is_some()).await.ok_or_else(shut_down)?;
        let n = from.read(&mut buf).await?;
        let Some(delay) = wait_for(&mut mode, |m| m.forwarding().is_some()).await.and_then(|m| m.forwarding()) else {
            return Err(shut_down());
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
            // The mode may have turned to a blackhole during the delay.
            wait_for(&mut mode, |m| m.forwarding().is_some()).await.ok_or_else(shut_down)?;
        }
        if n == 0 {
            // Pass the half-close on; the other direction keeps running.
            to.shutdown().await?;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}

fn shut_down() -> io::Error {
    io::Error::other("fault proxy shut down")
}
