//! arcfedctl: the operator CLI. Talks to the leader's AdminService over mTLS with an
//! `spiffe://arcfed/admin/<name>` certificate, following `x-arcfed-leader` redirects.
use crate::certs;
use crate::tls::{Role, TlsMaterial};
use anyhow::{Context, anyhow, bail};
use arcfed_proto as pb;
use arcfed_proto::admin_service_client::AdminServiceClient;
use clap::{Parser, Subcommand, ValueEnum};
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// arcfedctl: operate an arcfed coordinator quorum.
///
/// Every flag can also come from the env var shown in brackets. `certs` works offline; every
/// other command needs --endpoints and an admin certificate (role admin).
#[derive(Parser, Debug)]
#[command(name = "arcfedctl", version = arcfed_proto::ops::version_line())]
pub struct Cli {
    /// Coordinator gRPC addresses, comma-separated; any voter works (followers redirect).
    #[arg(long, env = "ARCFED_ENDPOINTS", value_delimiter = ',', value_name = "HOST:PORT,...", global = true)]
    pub endpoints: Vec<String>,
    #[command(flatten)]
    pub tls: arcfed_proto::ops::TlsArgs,
    /// Per-request timeout.
    #[arg(long, env = "ARCFED_TIMEOUT", value_parser = humantime::parse_duration, default_value = "5s", global = true)]
    pub timeout: Duration,
    /// Verify the voters' certificates against this DNS name instead of the host in
    /// --endpoints (and in leader redirects): for `kubectl port-forward` to 127.0.0.1, e.g.
    /// `arcfed-coordinator.arcfed-system.svc`, a name every voter certificate of deploy/ carries.
    #[arg(long, env = "ARCFED_TLS_SERVER_NAME", value_name = "NAME", global = true)]
    pub tls_server_name: Option<String>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Leader, term, voters, members and groups (holder, token, sessions, leases, assignments).
    Status {
        /// Output format: table, wide (every column, full ids), json (stable), yaml.
        #[arg(short = 'o', long = "output", env = "ARCFED_OUTPUT", value_enum, default_value = "table")]
        output: Output,
        /// Print the status again every INTERVAL until interrupted (the table redrawn; with
        /// -o json one compact JSON object per line). A failed read is printed and retried.
        #[arg(short = 'w', long, env = "ARCFED_WATCH", value_name = "INTERVAL", value_parser = humantime::parse_duration, num_args = 0..=1, default_missing_value = "2s")]
        watch: Option<Duration>,
    },
    /// Ask a group's holder to release, then grant the target (or the coordinator's choice).
    Handover {
        /// Group key (or a unique substring of it), e.g. `https://github.com/org#42`.
        group: String,
        /// Member id (or unique prefix) to grant next.
        #[arg(long, env = "ARCFED_HANDOVER_TO")]
        to: Option<String>,
        /// How long the holder has to release before it is revoked (default: the coordinator's --handover-timeout).
        #[arg(long, env = "ARCFED_HANDOVER_DEADLINE", value_parser = humantime::parse_duration)]
        deadline: Option<Duration>,
    },
    /// Drain a member: assignment 0, and a handover if it holds its group. One-way for that
    /// agent process: a restarted agent is a new member and is not draining.
    Drain {
        /// Member id (or unique prefix).
        member: String,
    },
    /// Run a failover drill against this deployment and report it (DESIGN §11 JSON with
    /// --json). kill-holder and freeze-holder are relayed through the leader to the holder's
    /// agent, which obeys only if started with --allow-drills; handover uses the admin RPC.
    /// GitHub-side fields are measured by `arcfed-sandbox --drill`, not here.
    Drill {
        /// kill-holder | freeze-holder | handover
        #[arg(value_enum)]
        scenario: crate::drill::Scenario,
        /// Repetitions.
        #[arg(long, env = "ARCFED_DRILL_RUNS", default_value = "1")]
        runs: usize,
        /// Group key (or a unique substring); default: the first group with a holder.
        #[arg(long, env = "ARCFED_DRILL_GROUP")]
        group: Option<String>,
        /// How long freeze-holder stops the holder's agent (past the lease TTL).
        #[arg(long, env = "ARCFED_DRILL_FREEZE", value_parser = humantime::parse_duration, default_value = "8s")]
        freeze: Duration,
        /// Longest wait for each step of a run.
        #[arg(long, env = "ARCFED_DRILL_WAIT", value_parser = humantime::parse_duration, default_value = "60s")]
        wait: Duration,
        /// Print the report as one JSON object (same as -o json with the object on one line).
        #[arg(long, env = "ARCFED_DRILL_JSON")]
        json: bool,
        /// Output format of the report: json (pretty) or yaml.
        #[arg(short = 'o', long = "output", env = "ARCFED_DRILL_OUTPUT", value_enum, default_value = "json")]
        output: Output,
    },
    /// Add or remove Raft voters.
    Voters {
        #[command(subcommand)]
        cmd: VotersCmd,
    },
    /// Which clusters may join which groups, with which priority, weight and member bounds
    /// (replicated; enforced when a member joins). See deploy/README.md, "Policy".
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Mint a CA and leaf certificates (cert-manager layout: tls.crt, tls.key, ca.crt).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Columns sized to their contents; member ids shortened.
    Table,
    /// The table with every column: full member ids, groups, weights, minimums, epochs.
    Wide,
    /// The stable JSON document (see deploy/README.md).
    Json,
    /// The same document as YAML.
    Yaml,
}

/// `value` as `format` (json: pretty; yaml), for the commands whose output is a document.
fn print_doc(value: &serde_json::Value, format: Output) -> anyhow::Result<()> {
    match format {
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        _ => println!("{}", serde_json::to_string_pretty(value)?),
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum VotersCmd {
    /// Add a voter (it joins as a learner, catches up, then becomes a voter).
    Add {
        /// The new voter's Raft node id (its --node-id).
        #[arg(long, env = "ARCFED_VOTER_ID")]
        id: u64,
        /// The new voter's gRPC address as the other voters reach it.
        #[arg(long, env = "ARCFED_VOTER_ADDRESS", value_name = "HOST:PORT")]
        address: String,
    },
    /// Remove a voter.
    Remove {
        /// The voter's Raft node id.
        #[arg(long, env = "ARCFED_VOTER_ID")]
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Replace the policy with the JSON in FILE (`-`: stdin); checked before it is proposed.
    Set {
        /// A JSON policy: {"rules": [{"groups": GLOB, "clusters": [...], "priority_min": N,
        /// "priority_max": N, "weight_max": N, "members_per_cluster": N}], "unmatched": "allow"|"deny"}.
        #[arg(long, env = "ARCFED_POLICY_FILE", value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the applied policy (JSON, or YAML with -o yaml).
    Show {
        /// Output format: json or yaml.
        #[arg(short = 'o', long = "output", env = "ARCFED_OUTPUT", value_enum, default_value = "json")]
        output: Output,
    },
}

#[derive(Subcommand, Debug)]
pub enum CertsCmd {
    /// Create a CA: writes ca.crt and ca.key into --out.
    Init {
        /// Directory to write ca.crt and ca.key (0600) into.
        #[arg(long, env = "ARCFED_CERTS_OUT", value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing CA (every certificate it signed stops being trusted).
        #[arg(long, env = "ARCFED_CERTS_FORCE")]
        force: bool,
    },
    /// Issue a leaf certificate signed by the CA in --ca: writes tls.crt, tls.key, ca.crt into --out.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, env = "ARCFED_CERTS_CA", value_name = "DIR")]
        ca: PathBuf,
        /// coordinator, agent or admin.
        #[arg(long, env = "ARCFED_CERTS_ROLE")]
        role: String,
        /// Node id (coordinator), cluster name (agent) or operator name (admin).
        #[arg(long, env = "ARCFED_CERTS_NAME")]
        name: String,
        /// DNS SAN to add (repeatable); coordinators need the names clients dial.
        #[arg(long, env = "ARCFED_CERTS_DNS", value_delimiter = ',')]
        dns: Vec<String>,
        /// IP SAN to add (repeatable).
        #[arg(long, env = "ARCFED_CERTS_IP", value_delimiter = ',')]
        ip: Vec<IpAddr>,
        /// Output directory.
        #[arg(long, env = "ARCFED_CERTS_OUT", value_name = "DIR")]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, env = "ARCFED_CERTS_DAYS", default_value = "365")]
        days: u32,
    },
    /// Issue a cluster issuer for one agent cluster: an intermediate CA (pathlen 0) that may
    /// sign only that cluster's agent identity; the cluster's cert-manager renews its agent
    /// certificate with it, and the federation CA's key never leaves your hands. Writes
    /// tls.crt (issuer + CA), tls.key and ca.crt into --out.
    Issuer {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, env = "ARCFED_CERTS_CA", value_name = "DIR")]
        ca: PathBuf,
        /// The agent cluster (its agents' --cluster) this issuer may issue for.
        #[arg(long, env = "ARCFED_CERTS_CLUSTER")]
        cluster: String,
        /// Output directory.
        #[arg(long, env = "ARCFED_CERTS_OUT", value_name = "DIR")]
        out: PathBuf,
        /// Validity in days (at most the CA's).
        #[arg(long, env = "ARCFED_CERTS_DAYS", default_value = "1825")]
        days: u32,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Certs { cmd } = &cli.cmd {
        return certs_cmd(cmd);
    }
    let mut admin = Admin::connect(&cli).await?;
    match cli.cmd {
        Cmd::Status { output, watch: None } => {
            let s = admin.call(|mut c| async move { c.status(pb::StatusRequest {}).await }).await?;
            match output {
                Output::Json | Output::Yaml => print_doc(&status_json(&s), output)?,
                Output::Table => print!("{}", status_table(&s)),
                Output::Wide => print!("{}", status_table_wide(&s, true)),
            }
        }
        Cmd::Status { output, watch: Some(every) } => {
            let every = every.max(Duration::from_millis(200));
            loop {
                let read = admin.call(|mut c| async move { c.status(pb::StatusRequest {}).await }).await;
                match (read, output) {
                    (Ok(s), Output::Json) => println!("{}", serde_json::to_string(&status_json(&s))?),
                    // One YAML document per reading.
                    (Ok(s), Output::Yaml) => print!("---\n{}", serde_yaml::to_string(&status_json(&s))?),
                    // Clear the screen and home the cursor, then the table, like `watch`.
                    (Ok(s), Output::Table) => print!("\x1b[2J\x1b[H{}", status_table(&s)),
                    (Ok(s), Output::Wide) => print!("\x1b[2J\x1b[H{}", status_table_wide(&s, true)),
                    (Err(e), _) => eprintln!("status: {e:#} (retrying)"),
                }
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
        Cmd::Handover { group, to, deadline } => {
            let call = pb::HandoverCall {
                group,
                to_member: to.unwrap_or_default(),
                deadline_ms: deadline.map(|d| d.as_millis() as u64).unwrap_or(0),
            };
            let r = admin
                .call(|mut c| {
                    let call = call.clone();
                    async move { c.handover(call).await }
                })
                .await?;
            println!("{}", r.message);
        }
        Cmd::Drill { scenario, runs, group, freeze, wait, json, output } => {
            let o = crate::drill::Options { scenario, runs: runs.max(1), group, freeze, wait };
            let report = crate::drill::run(&mut admin, &o).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print_doc(&serde_json::to_value(&report)?, output)?;
            }
        }
        Cmd::Drain { member } => {
            let r = admin
                .call(|mut c| {
                    let member = member.clone();
                    async move { c.drain(pb::DrainCall { member }).await }
                })
                .await?;
            println!("{}", r.message);
        }
        Cmd::Policy { cmd: PolicyCmd::Set { file } } => {
            let json = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("--file -: read stdin")?
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("--file {}", file.display()))?
            };
            // Checked here too, so a typo is named before anything reaches the quorum.
            let policy: crate::core::policy::Policy =
                serde_json::from_str(&json).with_context(|| format!("--file {}: not a policy", file.display()))?;
            policy.validate().map_err(|e| anyhow!("--file {}: {e}", file.display()))?;
            let r = admin
                .call(|mut c| {
                    let policy_json = json.clone();
                    async move { c.set_policy(pb::SetPolicyCall { policy_json }).await }
                })
                .await?;
            println!("{}", r.message);
        }
        Cmd::Policy { cmd: PolicyCmd::Show { output } } => {
            let r = admin.call(|mut c| async move { c.get_policy(pb::GetPolicyCall {}).await }).await?;
            let value: serde_json::Value =
                serde_json::from_str(&r.policy_json).context("the policy the quorum returned")?;
            print_doc(&value, output)?;
        }
        Cmd::Voters { cmd } => {
            let r = match cmd {
                VotersCmd::Add { id, address } => {
                    admin
                        .call(|mut c| {
                            let address = address.clone();
                            async move { c.add_voter(pb::AddVoterCall { id, address }).await }
                        })
                        .await?
                }
                VotersCmd::Remove { id } => {
                    admin.call(|mut c| async move { c.remove_voter(pb::RemoveVoterCall { id }).await }).await?
                }
            };
            println!("{}", r.message);
        }
        Cmd::Certs { .. } => {}
    }
    Ok(())
}

fn certs_cmd(cmd: &CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { out, force } => {
            certs::init_ca_with(out, *force)?;
            println!("wrote {}/ca.crt and {}/ca.key", out.display(), out.display());
        }
        CertsCmd::Issue { ca, role, name, dns, ip, out, days } => {
            let role: Role = role.parse().map_err(|e| anyhow!("--role: {e}"))?;
            certs::issue(&certs::IssueRequest {
                ca_dir: ca.clone(),
                role,
                name: name.clone(),
                dns: dns.clone(),
                ips: ip.clone(),
                out: out.clone(),
                days: *days,
            })?;
            println!("wrote {0}/tls.crt, {0}/tls.key and {0}/ca.crt for spiffe://arcfed/{role}/{name}", out.display());
        }
        CertsCmd::Issuer { ca, cluster, out, days } => {
            certs::issue_cluster_issuer(ca, cluster, out, *days)?;
            println!(
                "wrote {0}/tls.crt, {0}/tls.key and {0}/ca.crt: an issuer for spiffe://arcfed/agent/{cluster} only",
                out.display()
            );
        }
    }
    Ok(())
}

/// An admin connection that follows the leader.
pub(crate) struct Admin {
    tls: TlsMaterial,
    server_name: Option<String>,
    endpoints: Vec<String>,
    timeout: Duration,
    current: Option<(String, AdminServiceClient<Channel>)>,
}

impl Admin {
    async fn connect(cli: &Cli) -> anyhow::Result<Admin> {
        if cli.endpoints.is_empty() {
            bail!("--endpoints is required (a coordinator's HOST:PORT)");
        }
        let tls = cli
            .tls
            .require("(an admin certificate from `arcfedctl certs issue --role admin`)")
            .map_err(anyhow::Error::msg)?
            .load()?;
        Ok(Admin {
            tls,
            server_name: cli.tls_server_name.clone(),
            endpoints: cli.endpoints.clone(),
            timeout: cli.timeout,
            current: None,
        })
    }

    async fn client(&self, addr: &str) -> anyhow::Result<AdminServiceClient<Channel>> {
        let host = match &self.server_name {
            Some(name) => name.as_str(),
            None => addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).trim_matches(['[', ']']),
        };
        let ch = Endpoint::from_shared(format!("https://{addr}"))
            .with_context(|| format!("--endpoints: bad address {addr:?}"))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tls_config(self.tls.client_config(host))?
            .connect()
            .await
            .with_context(|| format!("connect to {addr}"))?;
        Ok(AdminServiceClient::new(ch))
    }

    /// Calls `f` on the leader: tries each endpoint, follows `x-arcfed-leader` redirects.
    /// While an election runs (a voter answered that it knows no leader, or named one that
    /// does not serve yet) it tries every endpoint again for up to [`LEADER_WAIT`], so a
    /// command issued during a leader change waits for the new leader instead of failing.
    /// Endpoints that cannot be reached at all fail at once.
    pub(crate) async fn call<T, F, Fut>(&mut self, f: F) -> anyhow::Result<T>
    where
        F: Fn(AdminServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = std::time::Instant::now() + LEADER_WAIT;
        loop {
            match self.call_once(&f).await {
                Ok(r) => return Ok(r),
                Err((e, true)) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "no serving leader yet; trying every endpoint again");
                    self.current = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// One pass over the endpoints. The error says whether some voter answered "not the
    /// leader" (an election may be running) rather than only being unreachable.
    async fn call_once<T, F, Fut>(&mut self, f: &F) -> Result<T, (anyhow::Error, bool)>
    where
        F: Fn(AdminServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut queue: Vec<String> = match &self.current {
            Some((a, _)) => vec![a.clone()],
            None => self.endpoints.clone(),
        };
        let mut last_err = anyhow!("no endpoint answered");
        let mut no_leader = false;
        let mut hops = 0;
        while let Some(addr) = (!queue.is_empty()).then(|| queue.remove(0)) {
            let client = match &self.current {
                Some((a, c)) if *a == addr => c.clone(),
                _ => match self.client(&addr).await {
                    Ok(c) => c,
                    Err(e) => {
                        last_err = e;
                        continue;
                    }
                },
            };
            match f(client.clone()).await {
                Ok(r) => {
                    self.current = Some((addr, client));
                    return Ok(r.into_inner());
                }
                Err(st) if st.code() == tonic::Code::Unavailable => {
                    let leader = arcfed_proto::leader::leader_hint(&st);
                    last_err = anyhow!("{addr}: {}", st.message());
                    no_leader |= arcfed_proto::leader::is_not_leader(&st);
                    if let Some(l) = leader
                        && hops < 3
                        && l != addr
                    {
                        hops += 1;
                        queue.insert(0, l);
                    }
                }
                Err(st) => return Err((anyhow!("{addr}: {:?}: {}", st.code(), st.message()), false)),
            }
        }
        Err((last_err, no_leader))
    }
}

/// How long a command waits for a leader while an election runs (elections take well
/// under a second at the LAN defaults, about two at the WAN ones).
const LEADER_WAIT: Duration = Duration::from_secs(5);

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

fn ms(v: i64) -> String {
    if v < 0 { "-".into() } else { format!("{v}ms") }
}

/// `status -o json`: the shape scripts rely on (documented in the README).
pub fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    use serde_json::json;
    json!({
        "leader": s.leader,
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "quorum_contact_age_ms": s.quorum_contact_age_ms,
        "voters": s.voters.iter().map(|v| json!({
            "id": v.id, "address": v.address, "role": v.role, "reachable": v.reachable,
            "last_contact_ms": v.last_contact_ms,
        })).collect::<Vec<_>>(),
        "members": s.members.iter().map(|m| json!({
            "id": m.id, "cluster": m.cluster, "group": m.group, "status": m.status, "epoch": m.epoch,
            "ers": m.ers, "draining": m.draining, "standby": m.standby, "github_ready": m.github_ready,
            "weight": m.weight, "min_runners": m.min_runners, "max_runners": m.max_runners, "busy": m.busy,
            "lease_remaining_ms": m.lease_remaining_ms, "assignment": m.assignment,
        })).collect::<Vec<_>>(),
        "groups": s.groups.iter().map(|g| json!({
            "key": g.key,
            "holder": if g.holder.is_empty() { serde_json::Value::Null } else { json!(g.holder) },
            "holder_cluster": if g.holder_cluster.is_empty() { serde_json::Value::Null } else { json!(g.holder_cluster) },
            "token": g.token,
            "session_id": if g.session_id.is_empty() { serde_json::Value::Null } else { json!(g.session_id) },
            "stale_sessions": g.stale_sessions,
            "lease_remaining_ms": g.lease_remaining_ms,
            "assignments": g.assignments.iter().map(|a| json!({"member": a.member, "cluster": a.cluster, "runners": a.runners})).collect::<Vec<_>>(),
            "revision": g.revision,
            "last_acked_message_id": g.last_acked_message_id,
            "total_assigned_jobs": g.total_assigned_jobs,
            "handover": if g.handover_deadline_unix_ms == 0 { serde_json::Value::Null } else {
                json!({"to": g.handover_to, "deadline_unix_ms": g.handover_deadline_unix_ms}) },
        })).collect::<Vec<_>>(),
    })
}

/// `status` as a readable table.
pub fn status_table(s: &pb::StatusResponse) -> String {
    status_table_wide(s, false)
}

/// Rows under a header, each column as wide as its widest cell (WAN names and long member ids
/// never push the next column out of line), indented by two spaces.
fn columns(o: &mut String, headers: &[&str], rows: &[Vec<String>]) {
    use std::fmt::Write;
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let n = cells.len();
        let mut l = String::from(" ");
        for (i, c) in cells.into_iter().enumerate() {
            l.push(' ');
            l.push_str(c);
            if i + 1 < n {
                l.push_str(&" ".repeat(width[i] - c.chars().count()));
            }
        }
        l
    };
    let _ = writeln!(o, "{}", line(headers.to_vec()));
    for r in rows {
        let _ = writeln!(o, "{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// The status as tables; `wide` adds full member ids, groups, weights, minimums and epochs.
pub fn status_table_wide(s: &pb::StatusResponse, wide: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "leader {}  term {}  commit {}  applied {}  quorum contact {}",
        s.leader,
        s.term,
        s.commit_index,
        s.applied_index,
        ms(s.quorum_contact_age_ms)
    );
    let _ = writeln!(o, "\nVOTERS");
    let voters: Vec<Vec<String>> = s
        .voters
        .iter()
        .map(|v| {
            vec![
                v.id.to_string(),
                v.address.clone(),
                v.role.clone(),
                if v.reachable { "yes" } else { "no" }.to_string(),
                if v.last_contact_ms < 0 { "never".to_string() } else { format!("{}ms ago", v.last_contact_ms) },
            ]
        })
        .collect();
    columns(&mut o, &["ID", "ADDRESS", "ROLE", "REACHABLE", "LAST CONTACT"], &voters);
    let _ = writeln!(o, "\nMEMBERS");
    let members: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            let mut flags = Vec::new();
            if m.draining {
                flags.push("draining");
            }
            if m.standby {
                flags.push("standby");
            }
            if !m.github_ready {
                flags.push("not-ready");
            }
            let mut row = vec![
                if wide { m.id.clone() } else { short(&m.id).to_string() },
                m.cluster.clone(),
                m.status.clone(),
                m.epoch.to_string(),
                m.ers.clone(),
                m.assignment.to_string(),
            ];
            if wide {
                row.extend([m.min_runners.to_string(), m.weight.to_string()]);
            }
            row.extend([m.max_runners.to_string(), m.busy.to_string(), ms(m.lease_remaining_ms), flags.join(",")]);
            if wide {
                row.push(m.group.clone());
            }
            row
        })
        .collect();
    let mut headers = vec!["ID", "CLUSTER", "STATUS", "EPOCH", "ERS", "ASSIGN"];
    if wide {
        headers.extend(["MIN", "WEIGHT"]);
    }
    headers.extend(["MAX", "BUSY", "LEASE", "FLAGS"]);
    if wide {
        headers.push("GROUP");
    }
    columns(&mut o, &headers, &members);
    let _ = writeln!(o, "\nGROUPS");
    for g in &s.groups {
        let holder = if g.holder.is_empty() {
            "(none)".to_string()
        } else {
            format!("{}/{}", g.holder_cluster, if wide { &g.holder } else { short(&g.holder) })
        };
        let _ = writeln!(o, "  {}", g.key);
        let _ = writeln!(
            o,
            "    holder {holder}  token {}  lease {}  session {}  stale {}",
            g.token,
            ms(g.lease_remaining_ms),
            if g.session_id.is_empty() { "-" } else { &g.session_id },
            if g.stale_sessions.is_empty() { "-".to_string() } else { g.stale_sessions.join(",") }
        );
        let assign: Vec<String> = g.assignments.iter().map(|a| format!("{}={}", a.cluster, a.runners)).collect();
        let _ = writeln!(
            o,
            "    jobs {}  last message {}  revision {}  assignments {}",
            g.total_assigned_jobs,
            g.last_acked_message_id,
            g.revision,
            if assign.is_empty() { "-".into() } else { assign.join(" ") }
        );
        if g.handover_deadline_unix_ms != 0 {
            let to = if g.handover_to.is_empty() {
                "coordinator's choice"
            } else if wide {
                &g.handover_to
            } else {
                short(&g.handover_to)
            };
            let _ = writeln!(o, "    handover pending → {to}");
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> pb::StatusResponse {
        pb::StatusResponse {
            leader: 1,
            term: 4,
            voters: vec![
                pb::Voter { id: 1, address: "a:1".into(), role: "leader".into(), reachable: true, last_contact_ms: 0 },
                pb::Voter {
                    id: 2,
                    address: "b:1".into(),
                    role: "unreachable".into(),
                    reachable: false,
                    last_contact_ms: 4200,
                },
                pb::Voter {
                    id: 3,
                    address: "c:1".into(),
                    role: "unreachable".into(),
                    reachable: false,
                    last_contact_ms: -1,
                },
            ],
            members: vec![pb::MemberStatus {
                id: "0123456789abcdef".into(),
                cluster: "east".into(),
                status: "live".into(),
                assignment: 7,
                max_runners: 10,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn tables_size_columns_to_their_contents_and_wide_shows_full_ids() {
        let mut s = sample();
        s.voters[0].address = "voter-1.eu-west.arcfed.example.net:7000".into();
        let t = status_table(&s);
        // Each voter row's ROLE starts where the header's does, whatever the address length.
        let lines: Vec<&str> = t.lines().skip_while(|l| *l != "VOTERS").skip(1).take(3).collect();
        let col = lines[0].find("ROLE").expect("ROLE header");
        for l in &lines[1..] {
            assert!(l[col..].starts_with("leader") || l[col..].starts_with("unreachable"), "{t}");
        }
        let id = s.members[0].id.clone();
        assert!(!t.contains(&id) || id.len() <= 8, "the table shortens member ids");
        let w = status_table_wide(&s, true);
        assert!(w.contains(&id) && w.contains("WEIGHT") && w.contains("GROUP"), "{w}");
        let y = serde_yaml::to_string(&status_json(&s)).expect("yaml");
        assert!(y.contains("leader: 1") && y.contains("voters:"), "{y}");
    }

    #[test]
    fn status_shows_voter_reachability_last_contact_and_member_assignments() {
        let t = status_table(&sample());
        let b = t.lines().find(|l| l.trim_start().starts_with("2 ")).expect("voter 2 row");
        assert!(b.contains("unreachable") && b.contains(" no ") && b.contains("4200ms ago"), "{b}");
        let c = t.lines().find(|l| l.trim_start().starts_with("3 ")).expect("voter 3 row");
        assert!(c.contains("never"), "{c}");
        let m = t.lines().find(|l| l.contains("01234567")).expect("member row");
        assert!(m.split_whitespace().any(|w| w == "7"), "{m}");
        let j = status_json(&sample());
        assert_eq!(j["voters"][1]["reachable"], false);
        assert_eq!(j["voters"][1]["last_contact_ms"], 4200);
        assert_eq!(j["members"][0]["assignment"], 7);
    }
}
