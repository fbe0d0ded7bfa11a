//! Real `arcfed-coordinator` processes on 127.0.0.1, with certificates minted by
//! `arcfedctl certs`, and helpers to kill, freeze, restart and query them.
//!
//! How tests find binaries: [`bin_path`] uses `$ARCFED_BIN_DIR` when set, else the
//! directory of the running test executable's parent (`target/<profile>/`), where
//! `cargo nextest run --workspace` / `cargo test --workspace` put every workspace binary.

use crate::agent_client::TlsFiles;
use crate::fault_proxy::{FaultProxy, Mode};
use anyhow::{Context, bail};
use arcfed_proto as pb;
use arcfed_proto::admin_service_client::AdminServiceClient;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary (see the module docs).
pub fn bin_path(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("ARCFED_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // Test executables live in target/<profile>/deps/, binaries in target/<profile>/.
    let mut dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    dir.join(name)
}

/// A free 127.0.0.1 port (bound and released; fine for tests that run serially).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// `n` distinct free 127.0.0.1 ports, each still bound by the returned listeners: while they
/// are held nothing else (a fault proxy binding port 0, say) can take them. Ports released one
/// at a time can come back twice: a quorum whose two voters got the same port had one voter's
/// replication reach its own listener (openraft's leader then panicked on its own
/// AppendEntries).
pub fn hold_free_ports(n: usize) -> (Vec<u16>, Vec<TcpListener>) {
    let held: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("free port")).collect();
    let ports = held.iter().map(|l| l.local_addr().expect("bound").port()).collect();
    (ports, held)
}

/// One child process of a workspace binary, its stderr appended to a log file. Faults are
/// real signals: SIGKILL, SIGTERM, SIGSTOP/SIGCONT. Voters and agents both use it.
pub struct Proc {
    /// The program: a workspace binary (see [`bin_path`]) or, for the lab's peers, any path.
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pub log: PathBuf,
    /// Run inside this network namespace (`ip netns exec`, which execs: the pid and the
    /// signals are the binary's own).
    pub netns: Option<String>,
    child: Option<Child>,
}

impl Proc {
    pub fn new(bin: &'static str, args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Proc {
        Proc::program(bin_path(bin), args, env, log)
    }

    /// A program outside the workspace (the lab's etcd, kube-apiserver, ARC).
    pub fn program(program: PathBuf, args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Proc {
        Proc { program, args, env, log, netns: None, child: None }
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.program);
                c
            }
            None => Command::new(&self.program),
        };
        cmd.args(&self.args).stdout(Stdio::null()).stderr(log).env_remove("LISTENER_CONFIG_PATH");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().with_context(|| format!("spawn {} (is it built?)", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Whether a child was started and not reaped by this handle.
    pub fn started(&self) -> bool {
        self.child.is_some()
    }

    fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args([sig, &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }

    /// SIGKILL and reap, as a node loss or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (what Kubernetes sends on pod deletion); waits up to `within`; the exit code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.signal("-TERM");
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                self.child = None;
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
        None
    }

    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// The same command again: a new process.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Started and not exited.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.thaw();
        self.kill();
    }
}

/// Runs `arcfedctl` with args; fails with its stderr.
pub fn arcfedctl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin_path("arcfedctl")).args(args).output().context("run arcfedctl")?;
    if !out.status.success() {
        bail!("arcfedctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A CA and leaf certificates under one directory.
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    pub fn init(dir: &Path) -> anyhow::Result<Certs> {
        std::fs::create_dir_all(dir)?;
        arcfedctl(&["certs", "init", "--out", &dir.join("ca").display().to_string()])?;
        Ok(Certs { dir: dir.to_path_buf() })
    }

    fn issue(&self, role: &str, name: &str, extra_ips: &[std::net::IpAddr]) -> anyhow::Result<TlsFiles> {
        let out = self.dir.join(format!("{role}-{name}"));
        if !out.join("tls.crt").exists() {
            let ca = self.dir.join("ca").display().to_string();
            let o = out.display().to_string();
            let mut args = vec!["certs", "issue", "--ca", &ca, "--role", role, "--name", name, "--out", &o];
            let ips: Vec<String> = extra_ips.iter().map(|i| i.to_string()).collect();
            if role == "coordinator" {
                args.extend(["--ip", "127.0.0.1", "--dns", "localhost"]);
                for ip in &ips {
                    args.extend(["--ip", ip]);
                }
            }
            arcfedctl(&args)?;
        }
        Ok(TlsFiles::in_dir(out))
    }
    pub fn coordinator(&self, id: u64) -> anyhow::Result<TlsFiles> {
        self.issue("coordinator", &id.to_string(), &[])
    }
    /// A coordinator certificate that also names `ips` (a voter on a region's WAN address, and
    /// the address of the proxies in front of it).
    pub fn coordinator_at(&self, id: u64, ips: &[std::net::IpAddr]) -> anyhow::Result<TlsFiles> {
        self.issue("coordinator", &id.to_string(), ips)
    }
    pub fn agent(&self, cluster: &str) -> anyhow::Result<TlsFiles> {
        self.issue("agent", cluster, &[])
    }
    pub fn admin(&self, name: &str) -> anyhow::Result<TlsFiles> {
        self.issue("admin", name, &[])
    }
}

#[derive(Clone, Debug)]
pub struct QuorumOptions {
    pub voters: u64,
    pub lease_ttl: &'static str,
    /// Route every voter-to-voter connection through a fault proxy (one per direction).
    pub peer_proxies: bool,
    pub extra_args: Vec<String>,
    /// Voter i (1-based) runs in namespace `placement[i-1].0` on address `.1` (`--netns`
    /// regions); empty = every voter on 127.0.0.1.
    pub placement: Vec<(String, std::net::Ipv4Addr)>,
    /// More addresses every coordinator certificate names (where proxies in front of the
    /// voters listen with `--netns`).
    pub cert_ips: Vec<std::net::Ipv4Addr>,
    /// The address voters without a placement bind (127.0.0.1; the lab's bridge address when
    /// agents in pods dial them).
    pub bind_ip: std::net::Ipv4Addr,
}

impl Default for QuorumOptions {
    fn default() -> Self {
        QuorumOptions {
            voters: 3,
            lease_ttl: "3s",
            peer_proxies: false,
            extra_args: vec![],
            placement: vec![],
            cert_ips: vec![],
            bind_ip: std::net::Ipv4Addr::LOCALHOST,
        }
    }
}

pub struct Voter {
    pub id: u64,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    proc: Proc,
}

impl Voter {
    /// A voter's command line: `peers` are (id, address this voter dials), itself included.
    fn new(
        dir: &Path,
        id: u64,
        (grpc, http): (SocketAddr, SocketAddr),
        tls: &TlsFiles,
        lease_ttl: &str,
        peers: &[(u64, String)],
    ) -> Voter {
        let data_dir = dir.join(format!("voter-{id}"));
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            grpc.to_string(),
            "--admin-listen".into(),
            http.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--tls-cert".into(),
            tls.cert.display().to_string(),
            "--tls-key".into(),
            tls.key.display().to_string(),
            "--tls-ca".into(),
            tls.ca.display().to_string(),
            "--lease-ttl".into(),
            lease_ttl.into(),
        ];
        for (peer, addr) in peers {
            args.push("--peer".into());
            args.push(format!("{peer}={addr}"));
        }
        let log = dir.join(format!("voter-{id}.log"));
        let level = std::env::var("ARCFED_TEST_LOG")
            .unwrap_or_else(|_| "info,openraft=warn,tonic::transport::server::io_stream=debug".into());
        // Voters inherit the rest of the environment (the benchmarks' commands set
        // MALLOC_ARENA_MAX=2 there, as the image does).
        let proc = Proc::new("arcfed-coordinator", args, vec![("ARCFED_LOG_LEVEL".into(), level)], log.clone());
        Voter { id, grpc, http, log, data_dir, proc }
    }

    pub fn addr(&self) -> String {
        self.grpc.to_string()
    }
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }
    fn spawn(&mut self) -> anyhow::Result<()> {
        self.proc.spawn()
    }
    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.proc.kill()
    }
    /// SIGTERM and wait for exit; returns the exit status code.
    pub fn terminate(&mut self, within: Duration) -> Option<i32> {
        self.proc.terminate(within)
    }
    pub fn freeze(&self) {
        self.proc.freeze()
    }
    pub fn thaw(&self) {
        self.proc.thaw()
    }
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.proc.restart()
    }
    pub fn running(&self) -> bool {
        self.proc.started()
    }
    pub fn log_text(&self) -> String {
        self.proc.log_text()
    }
}

/// A quorum of real coordinator processes.
pub struct Quorum {
    pub opts: QuorumOptions,
    pub dir: PathBuf,
    pub certs: Certs,
    pub voters: Vec<Voter>,
    /// (from, to) → proxy that `from` uses to reach `to` (when peer_proxies).
    pub proxies: BTreeMap<(u64, u64), FaultProxy>,
    pub admin: TlsFiles,
}

impl Quorum {
    pub async fn start(dir: &Path, opts: QuorumOptions) -> anyhow::Result<Quorum> {
        let certs = Certs::init(&dir.join("certs"))?;
        let admin = certs.admin("test-operator")?;
        let ids: Vec<u64> = (1..=opts.voters).collect();
        if !opts.placement.is_empty() && opts.placement.len() < ids.len() {
            anyhow::bail!("{} voters need {} placements, got {}", ids.len(), ids.len(), opts.placement.len());
        }
        let place = |id: u64| opts.placement.get(id as usize - 1);
        // In a namespace the voter owns its address: fixed ports there, free ports on loopback,
        // distinct and held until the proxies are up and the voters about to bind them.
        let (ports, held) = hold_free_ports(2 * ids.len());
        let grpc: BTreeMap<u64, SocketAddr> = ids
            .iter()
            .zip(&ports)
            .map(|(id, port)| match place(*id) {
                Some((_, ip)) => (*id, SocketAddr::from((*ip, 7000))),
                None => (*id, SocketAddr::from((opts.bind_ip, *port))),
            })
            .collect();
        let http_ports = &ports[ids.len()..];
        let mut proxies = BTreeMap::new();
        if opts.peer_proxies {
            for from in &ids {
                for to in &ids {
                    if from != to {
                        proxies.insert((*from, *to), FaultProxy::start(grpc[to]).await?);
                    }
                }
            }
        }
        drop(held);
        let mut voters = Vec::new();
        for (id, http_port) in ids.iter().zip(http_ports) {
            let mut ips: Vec<std::net::IpAddr> = opts.cert_ips.iter().map(|i| (*i).into()).collect();
            ips.extend(place(*id).map(|(_, ip)| std::net::IpAddr::from(*ip)));
            if !opts.bind_ip.is_loopback() {
                ips.push(opts.bind_ip.into());
            }
            let tls = certs.coordinator_at(*id, &ips)?;
            let peers: Vec<(u64, String)> = ids
                .iter()
                .map(|peer| match proxies.get(&(*id, *peer)) {
                    Some(p) => (*peer, p.addr().to_string()),
                    None => (*peer, grpc[peer].to_string()),
                })
                .collect();
            let http = match place(*id) {
                Some((_, ip)) => SocketAddr::from((*ip, 8000)),
                None => SocketAddr::from((opts.bind_ip, *http_port)),
            };
            let mut v = Voter::new(dir, *id, (grpc[id], http), &tls, opts.lease_ttl, &peers);
            v.proc.args.extend(opts.extra_args.iter().cloned());
            v.proc.netns = place(*id).map(|(ns, _)| ns.clone());
            v.spawn()?;
            voters.push(v);
        }
        Ok(Quorum { opts, dir: dir.to_path_buf(), certs, voters, proxies, admin })
    }

    /// Starts one more coordinator process (not yet a member): its `--peer` list names the
    /// current voters and itself, and it waits to be added with `arcfedctl voters add`.
    pub fn spawn_extra_voter(&mut self, id: u64) -> anyhow::Result<&Voter> {
        let tls = self.certs.coordinator(id)?;
        let (ports, held) = hold_free_ports(2);
        drop(held);
        let grpc = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let mut peers = vec![(id, grpc.to_string())];
        peers.extend(self.voters.iter().map(|v| (v.id, v.grpc.to_string())));
        let http = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let mut v = Voter::new(&self.dir, id, (grpc, http), &tls, self.opts.lease_ttl, &peers);
        v.spawn()?;
        self.voters.push(v);
        Ok(self.voters.last().expect("just pushed"))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.voters.iter().map(|v| v.addr()).collect()
    }

    pub fn voter(&mut self, id: u64) -> &mut Voter {
        self.voters.iter_mut().find(|v| v.id == id).expect("voter id")
    }

    /// Admin Status from `addr` (no redirect following).
    pub async fn status_at(&self, addr: &str) -> Result<pb::StatusResponse, tonic::Status> {
        let ch = self.admin.channel(addr).map_err(|e| tonic::Status::internal(e.to_string()))?;
        let mut c = AdminServiceClient::new(ch);
        let mut req = tonic::Request::new(pb::StatusRequest {});
        req.set_timeout(Duration::from_secs(2));
        // A frozen (SIGSTOPped) voter accepts TCP but never finishes the TLS handshake, and
        // tonic does not enforce grpc-timeout on the client: bound the whole call here.
        match tokio::time::timeout(Duration::from_secs(2), c.status(req)).await {
            Ok(r) => r.map(|r| r.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!("{addr}: no answer within 2s"))),
        }
    }

    /// Status from whichever running voter serves it.
    pub async fn status(&self) -> anyhow::Result<pb::StatusResponse> {
        let mut last: Option<tonic::Status> = None;
        for v in self.voters.iter().filter(|v| v.running()) {
            match self.status_at(&v.addr()).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        bail!("no voter served status: {last:?}")
    }

    /// Waits until some voter serves (leader, promoted); returns the status.
    pub async fn wait_serving(&self, deadline: Duration) -> anyhow::Result<pb::StatusResponse> {
        self.wait_status("a serving leader", deadline, |_| true).await
    }

    /// Waits until the served status satisfies `cond`.
    pub async fn wait_status(
        &self,
        what: &str,
        deadline: Duration,
        cond: impl Fn(&pb::StatusResponse) -> bool,
    ) -> anyhow::Result<pb::StatusResponse> {
        let end = Instant::now() + deadline;
        let mut last: Option<String>;
        loop {
            match self.status().await {
                Ok(s) if cond(&s) => return Ok(s),
                Ok(s) => last = Some(format!("{s:?}")),
                Err(e) => last = Some(e.to_string()),
            }
            if Instant::now() > end {
                bail!("timed out after {deadline:?} waiting for {what}; last: {}", last.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Cuts `id` from every other voter (both directions) through the peer proxies.
    pub fn isolate(&self, id: u64, mode: Mode) {
        for ((from, to), p) in &self.proxies {
            if *from == id || *to == id {
                p.set_mode(mode.clone());
            }
        }
    }

    pub fn dump_logs(&self) -> String {
        self.voters.iter().map(|v| format!("==== voter {} ====\n{}\n", v.id, v.log_text())).collect()
    }
}

impl Drop for Quorum {
    /// With `ARCFED_TEST_KEEP_LOGS=<dir>`, every quorum's voter logs are copied there (one file
    /// per voter, named after the test and a timestamp) before its temp dir goes away:
    /// for reading elections in runs that passed.
    fn drop(&mut self) {
        let Some(keep) = std::env::var_os("ARCFED_TEST_KEEP_LOGS") else { return };
        let keep = PathBuf::from(keep);
        let _ = std::fs::create_dir_all(&keep);
        // nextest runs one test per process and names it on the command line.
        let test = std::env::args().skip(1).find(|a| !a.starts_with('-')).unwrap_or_else(|| "test".into());
        let test = test.rsplit("::").next().unwrap_or("test").to_string();
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        for v in &self.voters {
            let _ = std::fs::copy(&v.log, keep.join(format!("{test}-{stamp}-voter-{}.log", v.id)));
        }
    }
}
