//! Real regions for the sandbox (`--netns`, needs root): each region is a Linux network
//! namespace with its own kernel TCP stack; its voter and agent run inside it.
//!
//! ```text
//!   root ns: emulator on 10.B.255.1 (lo)      sandbox, arcfedctl, status sampler on afh<k>
//!      │ afg<k>1 (tap pair, own link) │ afg<k>2 …                    │ afh<k> 10.B.0.254 (tap)
//!      ▼                            ▼                              ▼
//!   ns afs<k>-a: gh0 10.B.1.2    ns afs<k>-b: gh0 10.B.2.2     ┌──────────────────────────┐
//!                afw<k>1 10.B.0.1 ───────(tap)──────────────▶  │ WAN switch (this process)│
//!                               afw<k>2 10.B.0.2 ──(tap)─────▶ │ delay, loss per frame    │
//! ```
//! The WAN is a small Ethernet switch in this process: every region's WAN interface (and the
//! root namespace's) is a TAP device whose frames it forwards to the other ports after the
//! link delay, `delay/2` per region port, so region↔region is `delay` one way and root↔region
//! `delay/2`. This kernel has no `sch_netem` (`tc qdisc add … netem` answers "Specified qdisc
//! kind is unknown"), so the delay is applied here, to real frames between real stacks.
//! Partitions are link cuts: `ip link set … down` on the region's WAN interface (cut from the
//! quorum, still reaching GitHub). `Wan::set_github_link` blackholes a region's GitHub link:
//! the `--netns` holder-stall drill cuts it for real (the agent's holder client gives up on a
//! silent path within seconds: 5 s TCP user timeout, holder requests bounded by half the
//! holder-stall time). Everything is removed when the [`Wan`] is dropped.

use anyhow::{Context, bail};
use std::collections::BinaryHeap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tun_tap::Iface;

/// The WAN's shape.
#[derive(Clone, Copy, Debug)]
pub struct WanOptions {
    /// One-way delay between two regions.
    pub delay: Duration,
    /// Probability that a frame to or from a region is dropped (0 = none).
    pub loss: f64,
}

impl Default for WanOptions {
    fn default() -> Self {
        WanOptions { delay: Duration::from_millis(40), loss: 0.0 }
    }
}

/// One region's namespace and addresses.
#[derive(Clone, Debug)]
pub struct WanRegion {
    pub name: String,
    /// The network namespace (`ip netns exec <ns> …`).
    pub ns: String,
    /// The region's address on the WAN (voter and agent bind it).
    pub ip: Ipv4Addr,
    wan_if: String,
    github_if: String,
    /// The region's end of its GitHub link (a TAP in the region).
    github_peer_if: String,
    /// Set: the GitHub link drops every frame silently, as a blackholed path does (a link
    /// set down would fail sends locally, which TCP keepalive never counts as a lost probe).
    github_cut: Arc<AtomicBool>,
}

/// The namespaces, links and the WAN switch. Dropping it removes them all.
pub struct Wan {
    pub regions: Vec<WanRegion>,
    /// The emulated GitHub's address, reachable from every region over its own link.
    pub github_ip: Ipv4Addr,
    /// The root namespace's address on the WAN (the sandbox's own connections).
    pub root_ip: Ipv4Addr,
    pub opts: WanOptions,
    root_if: String,
    stop: Arc<AtomicBool>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("run {} (is iproute2 installed?)", args[0]))?;
    if !o.status.success() {
        bail!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

/// Opens a TAP device named `name` (created, and removed when the last handle closes),
/// frames without a packet-info header.
fn open_tap(name: &str) -> anyhow::Result<Iface> {
    Iface::without_packet_info(name, tun_tap::Mode::Tap)
        .with_context(|| format!("create TAP device {name} (/dev/net/tun)"))
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A frame due on an output port.
struct Due {
    at: Instant,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Due {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Due {
    // Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// One switch port: its TAP, its half of every link's delay, and its output queue.
struct Port {
    tap: Iface,
    half_delay: Duration,
    lossy: bool,
    queue: Mutex<BinaryHeap<Due>>,
    ready: Condvar,
}

impl Wan {
    /// Creates one namespace per region, the GitHub links and the WAN switch.
    pub fn create(names: &[String], opts: WanOptions) -> anyhow::Result<Wan> {
        if !is_root() {
            bail!("--netns needs root: it creates network namespaces, TAP devices and veth links");
        }
        if names.len() > 9 {
            bail!("--netns supports at most 9 regions");
        }
        if !(0.0..1.0).contains(&opts.loss) {
            bail!("--wan-loss must be within 0..100 %");
        }
        // An instance number keeps names and subnets apart from another sandbox's.
        let k = (std::process::id() % 40) as u8;
        let b = 160 + k;
        let root_if = format!("afh{k}");
        let mut wan = Wan {
            regions: Vec::new(),
            github_ip: Ipv4Addr::new(10, b, 255, 1),
            root_ip: Ipv4Addr::new(10, b, 0, 254),
            opts,
            root_if: root_if.clone(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        for (i, name) in names.iter().enumerate() {
            let n = i as u8 + 1;
            wan.regions.push(WanRegion {
                name: name.clone(),
                ns: format!("afs{k}-{name}"),
                ip: Ipv4Addr::new(10, b, 0, n),
                wan_if: format!("afw{k}{n}"),
                github_if: format!("afg{k}{n}"),
                github_peer_if: format!("afq{k}{n}"),
                github_cut: Arc::new(AtomicBool::new(false)),
            });
        }
        wan.remove_links(); // leftovers of a crashed run with the same instance number
        let mut ports = Vec::new();
        // The root namespace's port.
        let fd = open_tap(&root_if)?;
        run(&["ip", "addr", "add", &format!("{}/24", wan.root_ip), "dev", &root_if])?;
        run(&["ip", "link", "set", &root_if, "up"])?;
        ports.push(Port::new(fd, Duration::ZERO, false));
        let gh = format!("{}/32", wan.github_ip);
        if !Command::new("ip")
            .args(["addr", "show", "dev", "lo"])
            .output()?
            .stdout
            .windows(gh.len())
            .any(|w| w == gh.as_bytes())
        {
            run(&["ip", "addr", "add", &gh, "dev", "lo"])?;
        }
        for (i, r) in wan.regions.iter().enumerate() {
            let n = i as u8 + 1;
            run(&["ip", "netns", "add", &r.ns])?;
            run(&["ip", "-n", &r.ns, "link", "set", "lo", "up"])?;
            // WAN: a TAP whose other end is the switch, moved into the region.
            let fd = open_tap(&r.wan_if)?;
            run(&["ip", "link", "set", &r.wan_if, "netns", &r.ns])?;
            run(&["ip", "-n", &r.ns, "addr", "add", &format!("{}/24", r.ip), "dev", &r.wan_if])?;
            run(&["ip", "-n", &r.ns, "link", "set", &r.wan_if, "up"])?;
            ports.push(Port::new(fd, opts.delay / 2, true));
            // GitHub: a link of its own to the root namespace, two TAPs joined here with no
            // delay, so that a cut can blackhole it.
            let root_end = open_tap(&r.github_if)?;
            run(&["ip", "addr", "add", &format!("10.{b}.{n}.1/30"), "dev", &r.github_if])?;
            run(&["ip", "link", "set", &r.github_if, "up"])?;
            let region_end = open_tap(&r.github_peer_if)?;
            run(&["ip", "link", "set", &r.github_peer_if, "netns", &r.ns])?;
            run(&["ip", "-n", &r.ns, "addr", "add", &format!("10.{b}.{n}.2/30"), "dev", &r.github_peer_if])?;
            run(&["ip", "-n", &r.ns, "link", "set", &r.github_peer_if, "up"])?;
            run(&["ip", "-n", &r.ns, "route", "add", &gh, "via", &format!("10.{b}.{n}.1")])?;
            let link = vec![Port::new(root_end, Duration::ZERO, false), Port::new(region_end, Duration::ZERO, false)];
            start_switch(link, 0.0, wan.stop.clone(), r.github_cut.clone());
        }
        start_switch(ports, opts.loss, wan.stop.clone(), Arc::new(AtomicBool::new(false)));
        Ok(wan)
    }

    /// The region named `name`.
    pub fn region(&self, name: &str) -> Option<&WanRegion> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Cuts (or restores) a region's WAN link: its voter and agent lose the quorum and every
    /// other region, and keep GitHub.
    pub fn set_wan_link(&self, name: &str, up: bool) -> anyhow::Result<()> {
        let r = self.region(name).with_context(|| format!("no region {name}"))?;
        run(&["ip", "-n", &r.ns, "link", "set", &r.wan_if, if up { "up" } else { "down" }])
    }

    /// Cuts (or restores) a region's link to GitHub, and only that: frames are dropped
    /// silently, so the region's TCP sees a dead path, not a local error.
    pub fn set_github_link(&self, name: &str, up: bool) -> anyhow::Result<()> {
        let r = self.region(name).with_context(|| format!("no region {name}"))?;
        r.github_cut.store(!up, Ordering::Relaxed);
        Ok(())
    }

    fn remove_links(&self) {
        for r in &self.regions {
            let _ = Command::new("ip").args(["netns", "del", &r.ns]).output();
            let _ = Command::new("ip").args(["link", "del", &r.github_if]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.root_if]).output();
    }
}

impl Drop for Wan {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.remove_links();
        let _ = Command::new("ip").args(["addr", "del", &format!("{}/32", self.github_ip), "dev", "lo"]).output();
    }
}

impl Port {
    fn new(tap: Iface, half_delay: Duration, lossy: bool) -> Port {
        Port { tap, half_delay, lossy, queue: Mutex::new(BinaryHeap::new()), ready: Condvar::new() }
    }

    fn push(&self, d: Due) {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(d);
        self.ready.notify_one();
    }
}

/// One reader thread per port floods each frame to every other port's queue (due after both
/// ports' half delays); one writer thread per port writes frames when due. Threads end when
/// their TAP goes away (the namespace is deleted) or `stop` is set.
fn start_switch(ports: Vec<Port>, loss: f64, stop: Arc<AtomicBool>, cut: Arc<AtomicBool>) {
    let ports: Arc<Vec<Port>> = Arc::new(ports);
    let seq = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for i in 0..ports.len() {
        let (p, s, st, cut) = (ports.clone(), seq.clone(), stop.clone(), cut.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            let mut rng = rand::rng();
            while !st.load(Ordering::Relaxed) {
                let n = match p[i].tap.recv(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                };
                if cut.load(Ordering::Relaxed) {
                    continue;
                }
                let now = Instant::now();
                for (j, out) in p.iter().enumerate() {
                    if j == i {
                        continue;
                    }
                    if loss > 0.0 && (p[i].lossy || out.lossy) && rand::Rng::random_bool(&mut rng, loss) {
                        continue;
                    }
                    let at = now + p[i].half_delay + out.half_delay;
                    out.push(Due { at, seq: s.fetch_add(1, Ordering::Relaxed), frame: buf[..n].to_vec() });
                }
            }
        });
        let (p, st) = (ports.clone(), stop.clone());
        std::thread::spawn(move || {
            let port = &p[i];
            let mut q = port.queue.lock().unwrap_or_else(|e| e.into_inner());
            while !st.load(Ordering::Relaxed) {
                let now = Instant::now();
                match q.peek().map(|d| d.at) {
                    Some(at) if at <= now => {
                        let d = q.pop().expect("peeked");
                        drop(q);
                        // A write to a link that is down fails (EIO): the frame is lost, as on a cut cable.
                        let _ = port.tap.send(&d.frame);
                        q = port.queue.lock().unwrap_or_else(|e| e.into_inner());
                    }
                    Some(at) => q = port.ready.wait_timeout(q, at - now).unwrap_or_else(|e| e.into_inner()).0,
                    None => {
                        q = port.ready.wait_timeout(q, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0
                    }
                }
            }
        });
    }
}
