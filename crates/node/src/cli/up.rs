//! `palaver up`: a local cluster of `palaver node` processes.
//!
//! The first start creates one data directory per node under `--data-dir`, initializes the
//! cluster on node 1 and joins the others to it; a later start on the same directory resumes
//! every node from its data. Each node is a separate OS process of this same binary. Ctrl-C
//! reaches every node (same process group) and each shuts down cleanly; `up` waits for them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::process::{Child, Command};

/// How long `up` waits for every shard to have a leader.
pub const LEADERS_DEADLINE_MS: u64 = 60_000;
/// How long `up` waits for nodes to exit after Ctrl-C before killing them.
pub const STOP_GRACE_MS: u64 = 10_000;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
    /// Where the nodes keep their data (one sub-directory per node).
    #[arg(long, default_value_os_t = super::default_up_dir())]
    data_dir: PathBuf,
    /// Data shards of a new cluster.
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// gRPC port of node 1; node i listens on base_port + i - 1.
    #[arg(long, default_value_t = 7101)]
    base_port: u16,
    /// HTTP port of node 1 (web page, WebSocket, HTTP API, metrics); node i listens on
    /// http_base_port + i - 1.
    #[arg(long, default_value_t = 8101)]
    http_base_port: u16,
}

/// Where the nodes of a local cluster listen.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Number of nodes.
    pub nodes: u16,
    /// Data shards of a new cluster.
    pub shards: u32,
    /// gRPC port of node 1 (node i: + i - 1).
    pub base_port: u16,
    /// HTTP port of node 1 (node i: + i - 1), if the nodes serve HTTP.
    pub http_base_port: Option<u16>,
    /// More arguments for every node.
    pub extra_args: Vec<String>,
}

/// A node process started by `up` or by `bench`.
#[derive(Debug)]
pub struct NodeProcess {
    /// gRPC address.
    pub addr: String,
    /// HTTP address, if it serves HTTP.
    pub http: Option<String>,
    /// The child process.
    pub child: Child,
}

/// Start `nodes` node processes of this binary under `data_dir` (resuming if it holds a cluster).
pub async fn start_cluster(data_dir: &Path, layout: &Layout, quiet: bool) -> anyhow::Result<Vec<NodeProcess>> {
    let exe = std::env::current_exe().context("locate the palaver binary")?;
    std::fs::create_dir_all(data_dir).with_context(|| format!("create {}", data_dir.display()))?;
    let first_addr = format!("127.0.0.1:{}", layout.base_port);
    let mut started = Vec::new();
    for i in 0..layout.nodes {
        let port = layout.base_port.checked_add(i).context("port out of range")?;
        let addr = format!("127.0.0.1:{port}");
        let http = match layout.http_base_port {
            Some(base) => Some(format!("127.0.0.1:{}", base.checked_add(i).context("port out of range")?)),
            None => None,
        };
        let dir = data_dir.join(format!("node{}", i + 1));
        let fresh = !dir.join("db").exists();
        let mut command = Command::new(&exe);
        command.arg("node").arg("--data-dir").arg(&dir).arg("--grpc-addr").arg(&addr);
        if let Some(http) = &http {
            command.arg("--http-addr").arg(http);
        }
        command.args(&layout.extra_args);
        if fresh && i == 0 {
            command.arg("--init-cluster").arg("--shards").arg(layout.shards.to_string());
        } else if fresh {
            command.arg("--join").arg(&first_addr);
        }
        if quiet {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        } else {
            let log = std::fs::File::create(data_dir.join(format!("node{}.log", i + 1)))?;
            command.stdout(Stdio::null()).stderr(log);
        }
        command.kill_on_drop(true);
        let child = command.spawn().with_context(|| format!("start node {}", i + 1))?;
        if !quiet {
            println!(
                "node {} pid {} grpc {addr} (log: {})",
                i + 1,
                child.id().unwrap_or(0),
                data_dir.join(format!("node{}.log", i + 1)).display()
            );
        }
        started.push(NodeProcess { addr: addr.clone(), http, child });
        // The first node must serve before the others can join through it.
        if i == 0 {
            wait_serving(&addr).await?;
        }
    }
    Ok(started)
}

async fn wait_serving(addr: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(LEADERS_DEADLINE_MS);
    while tokio::time::Instant::now() < deadline {
        if super::admin::fetch_status(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("node at {addr} did not start serving")
}

/// Wait until the status at `addr` shows `nodes` nodes and every shard with a leader and
/// min(3, nodes) voters; print progress unless `quiet`.
pub async fn wait_ready(addr: &str, nodes: usize, quiet: bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(LEADERS_DEADLINE_MS);
    let want_voters = nodes.min(3);
    let mut last = String::new();
    loop {
        if let Ok(status) = super::admin::fetch_status(addr).await {
            let total = status.shards.len();
            // Led, fully replicated, and on the nodes placement names (no move under way).
            let ready = status
                .shards
                .iter()
                .filter(|s| s.leader != 0 && s.voters.len() == want_voters && palaver_node::cluster::shard_placed(s))
                .count();
            let line = format!(
                "{} of {nodes} nodes registered, {ready} of {total} shards led with {want_voters} voters where placed",
                status.nodes.len()
            );
            if !quiet && line != last {
                println!("{line}");
                last = line;
            }
            if status.nodes.len() == nodes && ready == total && total > 0 {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("cluster not ready after {} s: {last}", LEADERS_DEADLINE_MS / 1000);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.nodes >= 1, "--nodes must be at least 1");
    let layout = Layout {
        nodes: args.nodes,
        shards: args.shards,
        base_port: args.base_port,
        http_base_port: Some(args.http_base_port),
        extra_args: Vec::new(),
    };
    let mut processes = start_cluster(&args.data_dir, &layout, false).await?;
    let first = processes.first().map(|p| p.addr.clone()).unwrap_or_default();
    tokio::select! {
        ready = wait_ready(&first, usize::from(args.nodes), false) => ready?,
        _ = tokio::signal::ctrl_c() => {
            stop_all(&mut processes).await;
            return Ok(());
        }
    }
    println!("cluster up. Open the web page on any node:");
    for (i, process) in processes.iter().enumerate() {
        if let Some(http) = &process.http {
            println!("  node {}: http://{http}/  (gRPC {})", i + 1, process.addr);
        }
    }
    println!("try: palaver chat --addr {first}   or   palaver admin --addr {first} status");
    println!("Ctrl-C stops every node; `palaver up --data-dir {}` resumes.", args.data_dir.display());
    let _ = tokio::signal::ctrl_c().await;
    stop_all(&mut processes).await;
    Ok(())
}

/// Ask every node to stop (SIGTERM through `kill`), wait, then kill stragglers.
pub async fn stop_all(processes: &mut [NodeProcess]) {
    for process in processes.iter() {
        if let Some(pid) = process.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
    }
    for process in processes.iter_mut() {
        let waited = tokio::time::timeout(Duration::from_millis(STOP_GRACE_MS), process.child.wait()).await;
        if waited.is_err() {
            let _ = process.child.kill().await;
        }
    }
}
