//! `palaver admin`: operator commands against any node.

use anyhow::Context;
use clap::{Args, Subcommand};
use palaver_proto::v1::admin_service_client::AdminServiceClient;
use palaver_proto::v1::{StatusRequest, StatusResponse};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Any node's gRPC address.
    #[arg(long, default_value = "127.0.0.1:7101")]
    addr: String,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Nodes and shards: replicas, leader, term, last applied index.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    match args.command {
        AdminCommand::Status { json } => {
            let status = fetch_status(&args.addr).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status_json(&status))?);
            } else {
                print!("{}", status_table(&status));
            }
            Ok(())
        }
    }
}

/// Ask the node at `addr` for the cluster's status.
pub async fn fetch_status(addr: &str) -> anyhow::Result<StatusResponse> {
    let mut client =
        AdminServiceClient::connect(format!("http://{addr}")).await.with_context(|| format!("connect to {addr}"))?;
    Ok(client.status(StatusRequest {}).await.with_context(|| format!("status from {addr}"))?.into_inner())
}

fn status_json(status: &StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "cluster_id": status.cluster_id,
        "answered_by": status.answered_by,
        "nodes": status.nodes.iter().map(|n| serde_json::json!({
            "node_id": n.node_id, "grpc_addr": n.grpc_addr, "reachable": n.reachable,
        })).collect::<Vec<_>>(),
        "shards": status.shards.iter().map(|s| serde_json::json!({
            "shard": s.shard,
            "voters": s.voters,
            "learners": s.learners,
            "placement": s.placement,
            "leader": s.leader,
            "term": s.term,
            "last_applied_index": s.last_applied_index,
            "replicas": s.replicas.iter().map(|r| serde_json::json!({
                "node_id": r.node_id, "state": r.state, "term": r.term, "leader": r.leader,
                "last_applied_index": r.last_applied_index, "last_log_index": r.last_log_index,
                "snapshot_index": r.snapshot_index,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn status_table(status: &StatusResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "cluster {} (answered by node {})", status.cluster_id, status.answered_by);
    let _ = writeln!(out, "\nNODE  ADDRESS                REACHABLE");
    for node in &status.nodes {
        let _ =
            writeln!(out, "{:<5} {:<22} {}", node.node_id, node.grpc_addr, if node.reachable { "yes" } else { "NO" });
    }
    let _ = writeln!(out, "\nSHARD  VOTERS        LEADER  TERM  APPLIED");
    for shard in &status.shards {
        let voters = shard.voters.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let leader = if shard.leader == 0 { "-".to_string() } else { shard.leader.to_string() };
        let _ = writeln!(
            out,
            "{:<6} {:<13} {:<7} {:<5} {}",
            shard.shard, voters, leader, shard.term, shard.last_applied_index
        );
    }
    out
}
