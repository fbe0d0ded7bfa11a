//! One lab cluster: a real etcd and a real kube-apiserver and kube-controller-manager (built
//! from their Go modules) on 127.0.0.1, with their own PKI, and `kubectl` pointed at them.
//! There is no scheduler and no kubelet here: [`super::kubelet`] binds pods and runs them as
//! local processes.

use crate::harness::Proc;
use crate::lab::peers::Peers;
use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Service CIDR of every lab cluster, and the API server's address in it.
const SERVICE_CIDR: &str = "10.96.0.0/24";
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);

/// A running lab cluster. Dropping it stops its processes (SIGKILL), leaving its directory.
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`
    pub server: String,
    pub api_port: u16,
    /// kubeconfig of a `system:masters` client (what a cluster admin's `kubectl` has).
    pub kubeconfig: PathBuf,
    /// The cluster CA (pods see it as the service-account `ca.crt`).
    pub ca_pem: String,
    /// The address pods reach the API server at (`KUBERNETES_SERVICE_HOST`), with `api_port`.
    pub advertise: Ipv4Addr,
    kubectl: PathBuf,
    etcd: Proc,
    apiserver: Proc,
    controller_manager: Proc,
}

/// The files of a cluster's PKI (all PEM, in `dir/pki`).
struct Pki {
    ca_crt: PathBuf,
    ca_key: PathBuf,
    serving_crt: PathBuf,
    serving_key: PathBuf,
    admin_crt: PathBuf,
    admin_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

fn mint_pki(dir: &Path, advertise: Ipv4Addr) -> anyhow::Result<(Pki, String)> {
    std::fs::create_dir_all(dir)?;
    let p = |n: &str| dir.join(n);
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "arcfed-lab cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, &ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_string(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
        "kubernetes.default.svc.cluster.local".into(),
    ])?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    serving.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    serving.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(SERVICE_IP)));
    if advertise != Ipv4Addr::LOCALHOST {
        serving.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(advertise)));
    }
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &issuer)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::new(Vec::<String>::new())?;
    admin.distinguished_name.push(DnType::CommonName, "arcfed-lab-admin");
    admin.distinguished_name.push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &issuer)?;

    let sa_key = KeyPair::generate()?;
    let pki = Pki {
        ca_crt: p("ca.crt"),
        ca_key: p("ca.key"),
        serving_crt: p("apiserver.crt"),
        serving_key: p("apiserver.key"),
        admin_crt: p("admin.crt"),
        admin_key: p("admin.key"),
        sa_key: p("sa.key"),
        sa_pub: p("sa.pub"),
    };
    write(&pki.ca_crt, &ca_pem)?;
    write(&pki.ca_key, &ca_key.serialize_pem())?;
    write(&pki.serving_crt, &serving_cert.pem())?;
    write(&pki.serving_key, &serving_key.serialize_pem())?;
    write(&pki.admin_crt, &admin_cert.pem())?;
    write(&pki.admin_key, &admin_key.serialize_pem())?;
    write(&pki.sa_key, &sa_key.serialize_pem())?;
    write(&pki.sa_pub, &sa_key.public_key_pem())?;
    Ok((pki, ca_pem))
}

fn kubeconfig(server: &str, ca: &Path, crt: &Path, key: &Path, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: admin\n  user:\n    client-certificate: {crt}\n    client-key: {key}\n\
         contexts:\n- name: {name}\n  context: {{cluster: {name}, user: admin}}\ncurrent-context: {name}\n",
        ca = ca.display(),
        crt = crt.display(),
        key = key.display()
    )
}

impl Cluster {
    /// Starts etcd, kube-apiserver and kube-controller-manager for cluster `name` under
    /// `root/name` and waits until the API server is ready (its `/readyz`) and the default
    /// namespace's service account exists. The API server listens on 127.0.0.1 and, for pods,
    /// on `advertise` (the lab network's host address; 127.0.0.1 when no pods run).
    pub async fn start(peers: &Peers, root: &Path, name: &str, advertise: Ipv4Addr) -> anyhow::Result<Cluster> {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("logs"))?;
        let (pki, ca_pem) = mint_pki(&dir.join("pki"), advertise)?;
        // Held on 0.0.0.0: the API server listens on every address, so a port taken on any
        // one of them (a voter on the lab bridge, say) must not be picked.
        let held: Vec<std::net::TcpListener> =
            (0..4).map(|_| std::net::TcpListener::bind("0.0.0.0:0")).collect::<Result<_, _>>()?;
        let ports: Vec<u16> = held.iter().map(|l| l.local_addr().map(|a| a.port())).collect::<Result<_, _>>()?;
        let (etcd_client, etcd_peer, api_port, kcm_port) = (ports[0], ports[1], ports[2], ports[3]);
        let server = format!("https://127.0.0.1:{api_port}");
        let kubeconfig_path = dir.join("kubeconfig");
        write(&kubeconfig_path, &kubeconfig(&server, &pki.ca_crt, &pki.admin_crt, &pki.admin_key, name))?;
        let s = |p: &Path| p.display().to_string();

        let etcd = Proc::program(
            peers.bin("etcd"),
            vec![
                format!("--name={name}"),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster={name}=http://127.0.0.1:{etcd_peer}"),
                "--log-level=warn".into(),
            ],
            vec![],
            dir.join("logs/etcd.log"),
        );
        let apiserver = Proc::program(
            peers.bin("kube-apiserver"),
            vec![
                format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
                format!("--bind-address={}", if advertise.is_loopback() { "127.0.0.1" } else { "0.0.0.0" }),
                format!("--advertise-address={advertise}"),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", dir.join("pki").display()),
                format!("--tls-cert-file={}", s(&pki.serving_crt)),
                format!("--tls-private-key-file={}", s(&pki.serving_key)),
                format!("--client-ca-file={}", s(&pki.ca_crt)),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", s(&pki.sa_pub)),
                format!("--service-account-signing-key-file={}", s(&pki.sa_key)),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=RBAC".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
            vec![],
            dir.join("logs/kube-apiserver.log"),
        );
        // The controller manager uses the admin's kubeconfig (`system:masters`).
        let kcm_kubeconfig = kubeconfig_path.clone();
        let controller_manager = Proc::program(
            peers.bin("kube-controller-manager"),
            vec![
                format!("--kubeconfig={}", s(&kcm_kubeconfig)),
                format!("--authentication-kubeconfig={}", s(&kcm_kubeconfig)),
                format!("--authorization-kubeconfig={}", s(&kcm_kubeconfig)),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={kcm_port}"),
                format!("--cert-dir={}", dir.join("pki/kcm").display()),
                // The service-account token controller needs the signing key and the root CA.
                format!("--service-account-private-key-file={}", s(&pki.sa_key)),
                format!("--root-ca-file={}", s(&pki.ca_crt)),
                format!("--cluster-signing-cert-file={}", s(&pki.ca_crt)),
                format!("--cluster-signing-key-file={}", s(&pki.ca_key)),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--leader-elect=false".into(),
                // No kubelet heartbeats here: the lab's node would be tainted and its pods evicted.
                "--controllers=*,-nodelifecycle".into(),
                "--use-service-account-credentials=false".into(),
                "--profiling=false".into(),
                "--v=0".into(),
            ],
            vec![],
            dir.join("logs/kube-controller-manager.log"),
        );
        drop(held);
        let mut c = Cluster {
            name: name.to_string(),
            dir,
            server,
            api_port,
            kubeconfig: kubeconfig_path,
            ca_pem,
            advertise,
            kubectl: peers.bin("kubectl"),
            etcd,
            apiserver,
            controller_manager,
        };
        c.etcd.spawn()?;
        c.apiserver.spawn()?;
        c.wait_ready(Duration::from_secs(120)).await?;
        c.controller_manager.spawn()?;
        // The service-account controller creates `default` in every namespace: its first one
        // says the controller manager works.
        c.wait_for(Duration::from_secs(60), "the default service account", |c| {
            c.kubectl_ok(&["-n", "default", "get", "serviceaccount", "default", "-o", "name"]).is_ok()
        })
        .await?;
        Ok(c)
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + within;
        loop {
            if self.kubectl_ok(&["get", "--raw", "/readyz"]).is_ok_and(|o| o.trim() == "ok") {
                return Ok(());
            }
            for (what, p) in [("etcd", &mut self.etcd), ("kube-apiserver", &mut self.apiserver)] {
                if !p.running() {
                    bail!("{what} of cluster {} exited: {}", self.name, tail(&p.log_text(), 20));
                }
            }
            if Instant::now() > end {
                bail!(
                    "kube-apiserver of cluster {} not ready in {within:?}: {}",
                    self.name,
                    tail(&self.apiserver.log_text(), 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Polls `ok` every 250 ms until it holds or `within` passes.
    pub async fn wait_for(
        &self,
        within: Duration,
        what: &str,
        mut ok: impl FnMut(&Cluster) -> bool,
    ) -> anyhow::Result<()> {
        let end = Instant::now() + within;
        while !ok(self) {
            if Instant::now() > end {
                bail!("cluster {}: {what} did not happen within {within:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Ok(())
    }

    /// Waits until each CRD (`<plural>.<group>`) is Established. (`kubectl wait` fails at once
    /// on a CRD whose status the API server has not written yet.)
    pub async fn wait_crds(&self, crds: &[&str]) -> anyhow::Result<()> {
        for crd in crds {
            self.wait_for(Duration::from_secs(60), &format!("CRD {crd} established"), |c| {
                c.kubectl_ok(&[
                    "get",
                    "crd",
                    crd,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
                ])
                .is_ok_and(|s| s.trim() == "True")
            })
            .await?;
        }
        Ok(())
    }

    /// `kubectl` against this cluster as its admin.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg(format!("--kubeconfig={}", self.kubeconfig.display())).stdin(Stdio::null());
        c
    }

    /// Runs kubectl with `args`; its stdout, or an error with its stderr.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        run(self.kubectl().args(args), &format!("kubectl {}", args.join(" ")))
    }

    /// Runs kubectl with `args` and `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = self
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawn kubectl")?;
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The last lines of each of this cluster's logs (for a failure message).
    pub fn dump_logs(&self) -> String {
        [
            ("etcd", &self.etcd),
            ("kube-apiserver", &self.apiserver),
            ("kube-controller-manager", &self.controller_manager),
        ]
        .iter()
        .map(|(n, p)| format!("--- {} {n}\n{}", self.name, tail(&p.log_text(), 15)))
        .collect::<Vec<_>>()
        .join("\n")
    }
}

/// Runs `cmd`; its stdout, or an error naming `what` with its stderr.
pub fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
