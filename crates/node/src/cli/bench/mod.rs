//! `palaver bench`: load generators against a 3-node loopback cluster, which the bench starts
//! in a temporary directory (fsync on) unless `--addr` names the nodes of a running one.
//!
//! - `raft`: consensus writes (room joins and leaves), commits/s and latency.
//! - `posts`: CRDT-plane posts into many rooms while subscribers receive: posts/s, ack latency,
//!   delivery latency, and every acknowledged post checked off at every subscriber.
//! - `ws`: many WebSocket clients: memory per idle connection, delivery latency with them
//!   open, and a chat-shaped load (rooms of a few subscribers, all posting), every
//!   acknowledged post checked off at every subscriber.

mod posts;
mod raft;
mod ws;

use std::time::Duration;

use clap::{Args, Subcommand};
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{
    LoginRequest, PipelineReply, PipelineRequest, RegisterRequest, pipeline_reply, pipeline_request,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::up::{self, NodeProcess};

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Consensus writes: membership changes through the shards' Raft groups.
    Raft(raft::RaftBenchArgs),
    /// CRDT writes: posts into many rooms, acknowledged at quorum, while subscribers receive.
    Posts(posts::PostsBenchArgs),
    /// WebSocket clients: idle connections' memory, delivery latency, a chat-shaped load.
    Ws(ws::WsBenchArgs),
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.command {
        BenchCommand::Raft(args) => raft::run(args).await,
        BenchCommand::Posts(args) => posts::run(args).await,
        BenchCommand::Ws(args) => ws::run(args).await,
    }
}

/// Which cluster a bench drives.
#[derive(Debug, Args)]
struct ClusterArgs {
    /// Use the running cluster of the node at this address (repeat for each node) instead of
    /// starting one.
    #[arg(long)]
    addr: Vec<String>,
    /// Data shards of the cluster the bench starts.
    #[arg(long, default_value_t = 64)]
    shards: u32,
    /// Nodes of the cluster the bench starts.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
}

/// The cluster under test: its nodes' addresses, and the processes if the bench started them.
struct Cluster {
    addrs: Vec<String>,
    processes: Vec<NodeProcess>,
    /// How the bench started the nodes, and their data, if it did.
    started: Option<(up::Layout, tempfile::TempDir)>,
}

impl Cluster {
    /// The running cluster named by `--addr`, or a fresh one (`--nodes`) on ports from
    /// `base_port`.
    async fn open(args: &ClusterArgs, base_port: u16) -> anyhow::Result<Self> {
        Self::open_with(args, base_port, None, Vec::new()).await
    }

    /// Like [`Cluster::open`]; a fresh cluster also serves HTTP on ports from `http_base_port`
    /// (if given) and its nodes get `extra_args`.
    async fn open_with(
        args: &ClusterArgs,
        base_port: u16,
        http_base_port: Option<u16>,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Self> {
        if !args.addr.is_empty() {
            return Ok(Self { addrs: args.addr.clone(), processes: Vec::new(), started: None });
        }
        let dir = tempfile::tempdir()?;
        println!(
            "starting a {}-node cluster ({} shards, fsync on) in {}",
            args.nodes,
            args.shards,
            dir.path().display()
        );
        let layout = up::Layout { nodes: args.nodes, shards: args.shards, base_port, http_base_port, extra_args };
        let processes = up::start_cluster(dir.path(), &layout, true).await?;
        let addrs: Vec<String> = processes.iter().map(|p| p.addr.clone()).collect();
        up::wait_ready(&addrs[0], usize::from(args.nodes), true).await?;
        Ok(Self { addrs, processes, started: Some((layout, dir)) })
    }

    /// Stop the nodes the bench started and start them again on their data; nothing with
    /// `--addr`.
    async fn restart(&mut self) -> anyhow::Result<()> {
        let Some((layout, dir)) = &self.started else { return Ok(()) };
        up::stop_all(&mut self.processes).await;
        self.processes = up::start_cluster(dir.path(), layout, true).await?;
        up::wait_ready(&self.addrs[0], self.processes.len(), true).await
    }

    /// A lazily connected channel to each node.
    fn channels(&self) -> anyhow::Result<Vec<Channel>> {
        Ok(self
            .addrs
            .iter()
            .map(|a| Channel::from_shared(format!("http://{a}")).map(|e| e.connect_lazy()))
            .collect::<Result<_, _>>()?)
    }

    /// CPU time the nodes the bench started have used so far (user and system, every thread),
    /// in seconds; `None` with `--addr` or when `/proc` cannot tell.
    fn nodes_cpu_seconds(&self) -> Option<f64> {
        if self.processes.is_empty() {
            return None;
        }
        self.processes.iter().map(|p| cpu_seconds(&p.child.id()?.to_string())).sum()
    }

    async fn stop(mut self) {
        up::stop_all(&mut self.processes).await;
    }
}

fn authed<T>(message: T, token: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    Ok(request)
}

/// Register `user` (if new) and log in: its token.
async fn login(client: &mut ChatServiceClient<Channel>, user: &str) -> anyhow::Result<String> {
    let password = "bench-password".to_string();
    let _ = client.register(RegisterRequest { user: user.into(), password: password.clone() }).await;
    Ok(client.login(LoginRequest { user: user.into(), password }).await?.into_inner().token)
}

/// CPU time process `pid` (or `self`) has used, user and system, every thread, in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    /// The unit of `/proc/*/stat` times (`USER_HZ`): 100 on every Linux ABI.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses): state is
    // the first, utime the 12th, stime the 13th.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / TICKS_PER_SECOND)
}

/// CPU time used from [`CpuMeter::start`] on, by the nodes the bench started and by the bench.
struct CpuMeter {
    nodes: Option<f64>,
    bench: Option<f64>,
}

impl CpuMeter {
    fn start(cluster: &Cluster) -> Self {
        Self { nodes: cluster.nodes_cpu_seconds(), bench: cpu_seconds("self") }
    }

    /// Microseconds of CPU per unit of `work` since the start, the nodes' then the bench's,
    /// as printed (`-` when unknown).
    fn per(&self, cluster: &Cluster, work: usize) -> [String; 2] {
        let per = |before: Option<f64>, after: Option<f64>| match (before, after) {
            (Some(before), Some(after)) if work > 0 => format!("{:.0}", (after - before) * 1e6 / work as f64),
            _ => "-".to_owned(),
        };
        [per(self.nodes, cluster.nodes_cpu_seconds()), per(self.bench, cpu_seconds("self"))]
    }
}

/// The `p` quantile (0..=1) of sorted durations, in milliseconds.
fn quantile_ms(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// A client's `Pipeline` stream, used with one request in flight at a time.
struct Pipeline {
    requests: mpsc::Sender<PipelineRequest>,
    replies: tonic::Streaming<PipelineReply>,
    next_id: u64,
}

impl Pipeline {
    /// Open a stream on `client` for the user of `token`.
    async fn open(mut client: ChatServiceClient<Channel>, token: &str) -> anyhow::Result<Self> {
        let (requests, outgoing) = mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        let replies = client.pipeline(authed(stream, token)?).await?.into_inner();
        Ok(Self { requests, replies, next_id: 0 })
    }

    /// Send `op` and wait for its reply; a broken stream comes back as its text.
    async fn call(&mut self, op: pipeline_request::Op) -> Result<pipeline_reply::Result, String> {
        self.next_id += 1;
        self.requests
            .send(PipelineRequest { id: self.next_id, op: Some(op) })
            .await
            .map_err(|_| "pipeline closed".to_string())?;
        loop {
            let reply = self
                .replies
                .message()
                .await
                .map_err(|status| format!("{}: {}", status.code(), status.message()))?
                .ok_or("pipeline ended")?;
            if reply.id == self.next_id {
                return reply.result.ok_or_else(|| "empty reply".into());
            }
        }
    }
}
