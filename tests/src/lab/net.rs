//! The lab's pod network: one Linux bridge per lab on its own /16, the host at `.0.1` on it,
//! and one network namespace per pod with a veth on the bridge. Pods have their own ports
//! (ARC's listener and controller both default to :8080), reach the API servers, the emulator
//! and the voters at the host address, and each other across the bridge. Needs root.
//!
//! Several labs can run at once (nextest runs tests in parallel): each takes the first free
//! bridge `aflab<k>` with subnet `10.<200+k>.0.0/16`; `ip link add` is the lock, and
//! `/run/arcfed-lab/aflab<k>` names the owner, so a bridge whose owner died is reclaimed.

use anyhow::{Context, bail};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Which process owns each bridge (a lab killed with SIGKILL leaves its bridge and namespaces;
/// the next lab removes them once their owner is gone).
const OWNERS: &str = "/run/arcfed-lab";

fn reclaim_if_stale(k: u8) {
    let bridge = format!("aflab{k}");
    let owner = std::fs::read_to_string(format!("{OWNERS}/{bridge}")).ok().and_then(|p| p.trim().parse::<u32>().ok());
    let alive = owner.is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
    let exists = Command::new("ip").args(["link", "show", &bridge]).output().is_ok_and(|o| o.status.success());
    if !exists || alive || owner.is_none() {
        return;
    }
    let prefix = format!("aflab{k}p");
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for ns in String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|n| n.starts_with(&prefix)) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
    let _ = ip(&["link", "del", &bridge]);
    let _ = std::fs::remove_file(format!("{OWNERS}/{bridge}"));
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// One lab's bridge. Dropping it removes the bridge and every pod namespace still present.
pub struct LabNet {
    pub bridge: String,
    k: u8,
    /// The host's address on the bridge: API servers, the emulator and voters listen here.
    pub host: Ipv4Addr,
    next: AtomicU32,
    namespaces: Mutex<Vec<String>>,
}

/// A pod's network: its namespace and address.
#[derive(Clone, Debug)]
pub struct PodNet {
    pub ns: String,
    pub ip: Ipv4Addr,
}

impl LabNet {
    pub fn create() -> anyhow::Result<LabNet> {
        if !rustix::process::geteuid().is_root() {
            bail!("the lab's pod network needs root (network namespaces, a bridge)");
        }
        std::fs::create_dir_all(OWNERS)?;
        for k in 0..50u8 {
            let bridge = format!("aflab{k}");
            reclaim_if_stale(k);
            if ip(&["link", "add", &bridge, "type", "bridge"]).is_err() {
                continue;
            }
            std::fs::write(format!("{OWNERS}/{bridge}"), std::process::id().to_string())?;
            let host = Ipv4Addr::new(10, 200 + k, 0, 1);
            ip(&["addr", "add", &format!("{host}/16"), "dev", &bridge])?;
            ip(&["link", "set", &bridge, "up"])?;
            return Ok(LabNet { bridge, k, host, next: AtomicU32::new(0), namespaces: Mutex::new(Vec::new()) });
        }
        bail!("no free lab bridge aflab0..aflab49 (remove stale ones: `ip link del aflab<k>`)")
    }

    /// A new namespace with a veth on the bridge, an address, loopback up and a default route
    /// via the host.
    pub fn pod(&self) -> anyhow::Result<PodNet> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        // 10.<200+k>.1.2 upward; .0.x is the host's.
        let idx = n + 258;
        let ip_addr = Ipv4Addr::new(10, 200 + self.k, (idx / 256) as u8, (idx % 256) as u8);
        let ns = format!("aflab{}p{n}", self.k);
        let host_if = format!("afl{}v{n}", self.k);
        ip(&["netns", "add", &ns])?;
        self.namespaces.lock().expect("lock").push(ns.clone());
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["link", "set", &host_if, "master", &self.bridge, "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{ip_addr}/16"), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "route", "add", "default", "via", &self.host.to_string()])?;
        Ok(PodNet { ns, ip: ip_addr })
    }

    /// Removes a pod's namespace (its veth goes with it).
    pub fn release(&self, pod: &PodNet) {
        let _ = ip(&["netns", "del", &pod.ns]);
        self.namespaces.lock().expect("lock").retain(|n| n != &pod.ns);
    }
}

impl Drop for LabNet {
    fn drop(&mut self) {
        for ns in self.namespaces.lock().map(|v| v.clone()).unwrap_or_default() {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        let _ = std::fs::remove_file(format!("{OWNERS}/{}", self.bridge));
    }
}
