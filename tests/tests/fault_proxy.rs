//! The TCP fault proxy against a tiny echo server. Silence ("nothing arrives") is shown with a
//! short read deadline; everything that must happen is awaited with a generous one.
use arcfed_tests::fault_proxy::{FaultProxy, Mode};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;

/// How long we listen to show that nothing arrives.
const SILENCE: Duration = Duration::from_millis(400);
/// How long something that must happen may take.
const WAIT: Duration = Duration::from_secs(10);

/// How one server-side connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Eof,
    Error(std::io::ErrorKind),
}

/// An echo server that reports each accepted connection and how each one ended.
struct Echo {
    addr: SocketAddr,
    accepted: mpsc::UnboundedReceiver<()>,
    ended: mpsc::UnboundedReceiver<Ended>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (acc_tx, accepted) = mpsc::unbounded_channel();
        let (end_tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = acc_tx.send(());
                let end_tx = end_tx.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let end = loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break Ended::Eof,
                            Ok(n) => {
                                if let Err(e) = s.write_all(&buf[..n]).await {
                                    break Ended::Error(e.kind());
                                }
                            }
                            Err(e) => break Ended::Error(e.kind()),
                        }
                    };
                    let _ = end_tx.send(end);
                });
            }
        });
        Echo { addr, accepted, ended }
    }
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    timeout(WAIT, s.read_exact(&mut got)).await.expect("echo within deadline").unwrap();
    assert_eq!(got, msg);
}

/// Whether the client sees nothing at all (no data, no EOF, no error) for `SILENCE`.
async fn is_silent(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    timeout(SILENCE, s.read(&mut b)).await.is_err()
}

/// Whether the client's stream ends (EOF or error) within `WAIT`.
async fn ends(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match timeout(WAIT, s.read(&mut b)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

async fn setup() -> (Echo, FaultProxy, TcpStream) {
    let mut echo = Echo::start().await;
    let proxy = FaultProxy::start(echo.addr).await.unwrap();
    let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
    roundtrip(&mut c, b"hello").await;
    timeout(WAIT, echo.accepted.recv()).await.unwrap().unwrap();
    (echo, proxy, c)
}

#[tokio::test]
async fn pass_forwards_both_ways_and_counts_connections() {
    let (_echo, proxy, mut c) = setup().await;
    roundtrip(&mut c, &vec![7u8; 200_000]).await;
    let mut c2 = TcpStream::connect(proxy.addr()).await.unwrap();
    roundtrip(&mut c2, b"second").await;
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(proxy.active(), 2);
}

#[tokio::test]
async fn a_client_close_reaches_the_server_as_eof() {
    let (mut echo, _proxy, mut c) = setup().await;
    c.shutdown().await.unwrap();
    assert_eq!(timeout(WAIT, echo.ended.recv()).await.unwrap(), Some(Ended::Eof));
}

#[tokio::test]
async fn blackhole_stalls_open_and_new_connections_and_pass_resumes_them() {
    let (mut echo, proxy, mut c) = setup().await;
    proxy.set_mode(Mode::Blackhole);
    c.write_all(b"held").await.unwrap();
    assert!(is_silent(&mut c).await, "an open connection must go silent");

    let mut late = TcpStream::connect(proxy.addr()).await.expect("a blackhole still accepts");
    late.write_all(b"late").await.unwrap();
    assert!(is_silent(&mut late).await, "a new connection must go silent");
    assert!(echo.accepted.try_recv().is_err(), "the server must not see the new connection yet");
    assert!(echo.ended.try_recv().is_err(), "nothing is closed");

    // Held bytes are delivered once the path heals, as retransmissions would be.
    proxy.set_mode(Mode::Pass);
    let mut got = [0u8; 4];
    timeout(WAIT, c.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"held");
    timeout(WAIT, late.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"late");
}

#[tokio::test]
async fn drop_closes_both_sides_and_refuses_new_connections() {
    let (mut echo, proxy, mut c) = setup().await;
    proxy.set_mode(Mode::Drop);
    assert!(ends(&mut c).await, "the client side must close");
    assert!(timeout(WAIT, echo.ended.recv()).await.unwrap().is_some(), "the server side must close");

    if let Ok(mut s) = TcpStream::connect(proxy.addr()).await {
        let _ = s.write_all(b"x").await;
        assert!(ends(&mut s).await, "a new connection must close at once");
    }
    assert!(echo.accepted.try_recv().is_err(), "the server never sees it");
    timeout(WAIT, async {
        while proxy.active() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every connection closed");

    proxy.set_mode(Mode::Pass);
    let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
    roundtrip(&mut again, b"back").await;
}

#[tokio::test]
async fn stall_connects_resets_open_connections_and_holds_new_ones_in_the_handshake() {
    let (_echo, proxy, mut c) = setup().await;
    proxy.set_mode(Mode::StallConnects);
    assert!(ends(&mut c).await, "an open connection is reset");
    timeout(WAIT, async {
        while !proxy.connects_stalled() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the backlog is plugged");
    // The kernel drops the SYN: the connect neither completes nor fails.
    let pending = tokio::spawn(TcpStream::connect(proxy.addr()));
    tokio::time::sleep(SILENCE).await;
    assert!(!pending.is_finished(), "a connect completed while connects stall");
    proxy.set_mode(Mode::Pass);
    // The retransmitted SYN gets in (the first retransmission is after about 1 s, then 3 s).
    let mut late = timeout(WAIT, pending).await.expect("connects after the stall").unwrap().unwrap();
    roundtrip(&mut late, b"late").await;
    assert!(!proxy.connects_stalled());
}

#[tokio::test]
async fn reset_upstream_closes_the_server_side_only() {
    let (mut echo, proxy, mut c) = setup().await;
    proxy.set_mode(Mode::ResetUpstreamBlackholeDownstream);
    let end = timeout(WAIT, echo.ended.recv()).await.expect("the server sees its side close").unwrap();
    assert!(matches!(end, Ended::Eof | Ended::Error(_)), "{end:?}");
    c.write_all(b"anyone?").await.expect("the client can still write");
    assert!(is_silent(&mut c).await, "the client must see no EOF and no data");

    // When the path heals, the client's stale connection is reset.
    proxy.set_mode(Mode::Pass);
    assert!(ends(&mut c).await);
}

#[tokio::test]
async fn reset_downstream_closes_the_client_side_only() {
    let (mut echo, proxy, mut c) = setup().await;
    proxy.set_mode(Mode::ResetDownstreamBlackholeUpstream);
    assert!(ends(&mut c).await, "the client sees its side close");
    let quiet = timeout(SILENCE, echo.ended.recv()).await;
    assert!(quiet.is_err(), "the server must see nothing: {quiet:?}");

    proxy.set_mode(Mode::Pass);
    assert!(timeout(WAIT, echo.ended.recv()).await.unwrap().is_some(), "healed: the server side is reset too");
}

#[tokio::test]
async fn delay_still_delivers_every_byte() {
    let (_echo, proxy, mut c) = setup().await;
    let delay = Duration::from_millis(100);
    proxy.set_mode(Mode::Delay(delay));
    let start = Instant::now();
    roundtrip(&mut c, b"slow").await;
    // Both directions are delayed; only the lower bound is safe to assert.
    assert!(start.elapsed() >= delay * 2, "{:?}", start.elapsed());
    roundtrip(&mut c, &vec![1u8; 100_000]).await;
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let (mut echo, proxy, mut c) = setup().await;
    drop(proxy);
    assert!(ends(&mut c).await);
    assert!(timeout(WAIT, echo.ended.recv()).await.unwrap().is_some());
}
