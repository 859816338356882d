//! `palaver bench idle`: what a cluster costs with no client at all. It starts a cluster, lets
//! it settle, then measures the CPU its nodes use over a few windows and prints the median per
//! node, with how many Raft replicas had their timer stopped (see `palaver_node::quiesce`).
//! Every shard group costs something even when idle; this is the figure that says how much.

use std::time::Duration;

use clap::Args;
use palaver_proto::v1::StatusRequest;
use palaver_proto::v1::admin_service_client::AdminServiceClient;

use super::{Cluster, ClusterArgs, median};

#[derive(Debug, Args)]
pub struct IdleBenchArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Seconds to wait after the cluster is ready, before the first window.
    #[arg(long, default_value_t = 5)]
    settle: u64,
    /// Seconds per window.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Windows measured (the median is printed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// First gRPC port of the cluster the bench starts.
    #[arg(long, default_value_t = 7601)]
    base_port: u16,
}

pub async fn run(args: IdleBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.cluster.addr.is_empty(), "bench idle measures the nodes it starts: drop --addr");
    anyhow::ensure!(args.seconds > 0 && args.rounds > 0, "--seconds and --rounds must be at least 1");
    let cluster = Cluster::open(&args.cluster, args.base_port).await?;
    let result = measure(&cluster, &args).await;
    cluster.stop().await;
    result
}

async fn measure(cluster: &Cluster, args: &IdleBenchArgs) -> anyhow::Result<()> {
    tokio::time::sleep(Duration::from_secs(args.settle)).await;
    let nodes = cluster.processes.len() as f64;
    let mut per_node = Vec::new();
    for round in 1..=args.rounds {
        let before = cluster.nodes_cpu_seconds().ok_or_else(|| anyhow::anyhow!("no CPU times in /proc"))?;
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let after = cluster.nodes_cpu_seconds().ok_or_else(|| anyhow::anyhow!("no CPU times in /proc"))?;
        let cores = (after - before) / args.seconds as f64 / nodes;
        let (asleep, replicas) = asleep_replicas(cluster).await?;
        println!("window {round}: {cores:.3} cores per node; {asleep} of {replicas} replicas asleep");
        per_node.push(cores);
    }
    let cores = median(per_node).unwrap_or(0.0);
    println!(
        "idle {} nodes, {} shards: median {cores:.3} cores per node ({:.1} ms of CPU per second)",
        args.cluster.nodes,
        args.cluster.shards,
        cores * 1000.0
    );
    Ok(())
}

/// Replicas with their Raft timer stopped, and all replicas, as the first node's status says.
async fn asleep_replicas(cluster: &Cluster) -> anyhow::Result<(usize, usize)> {
    let channel = cluster.channels()?.into_iter().next().ok_or_else(|| anyhow::anyhow!("no node"))?;
    let status = AdminServiceClient::new(channel).status(StatusRequest {}).await?.into_inner();
    let replicas = status.shards.iter().flat_map(|s| &s.replicas);
    Ok((replicas.clone().filter(|r| r.asleep).count(), replicas.count()))
}
