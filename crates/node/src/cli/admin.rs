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
            "peer_id": n.peer_id, "p2p_addrs": n.p2p_addrs, "dht_peers": n.dht_peers,
            "feeds_open": n.feeds_open, "http_addr": n.http_addr,
        })).collect::<Vec<_>>(),
        "routes": status.routes.as_ref().map(|r| serde_json::json!({
            "cache_hits": r.cache_hits, "cache_misses": r.cache_misses, "corrections": r.corrections,
            "dht_lookups": r.dht_lookups, "dht_found": r.dht_found, "meta_fallbacks": r.meta_fallbacks,
            "epoch_hints": r.epoch_hints,
        })),
        "shards": status.shards.iter().map(|s| serde_json::json!({
            "shard": s.shard,
            "voters": s.voters,
            "learners": s.learners,
            "placement": s.placement,
            "leader": s.leader,
            "term": s.term,
            "last_applied_index": s.last_applied_index,
            "directory": s.directory.as_ref().map(|d| serde_json::json!({
                "found": d.found, "replicas": d.replicas, "leader": d.leader, "term": d.term,
                "config_index": d.config_index,
            })),
            "replicas": s.replicas.iter().map(|r| serde_json::json!({
                "node_id": r.node_id, "state": r.state, "term": r.term, "leader": r.leader,
                "last_applied_index": r.last_applied_index, "last_log_index": r.last_log_index,
                "snapshot_index": r.snapshot_index, "asleep": r.asleep,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn status_table(status: &StatusResponse) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "cluster {} (answered by node {})", status.cluster_id, status.answered_by);
    let _ = writeln!(out, "\nNODE  ADDRESS                HTTP                   REACHABLE  DHT PEERS  PEER ID");
    for node in &status.nodes {
        let reachable = if node.reachable { "yes" } else { "NO" };
        let http = if node.http_addr.is_empty() { "-" } else { node.http_addr.as_str() };
        let _ = writeln!(
            out,
            "{:<5} {:<22} {:<22} {:<10} {:<10} {}",
            node.node_id,
            node.grpc_addr,
            http,
            reachable,
            node.dht_peers.len(),
            node.peer_id
        );
    }
    let _ = writeln!(out, "\nSHARD  VOTERS        LEADER  TERM  APPLIED  ASLEEP  DHT RECORD (replicas/leader/epoch)");
    for shard in &status.shards {
        let voters = shard.voters.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
        let leader = if shard.leader == 0 { "-".to_string() } else { shard.leader.to_string() };
        // Replicas with their Raft timer stopped, of those that answered.
        let asleep = format!("{}/{}", shard.replicas.iter().filter(|r| r.asleep).count(), shard.replicas.len());
        let record = match &shard.directory {
            Some(d) if d.found => {
                let replicas = d.replicas.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
                format!("{replicas}/{}/{}.{}", d.leader, d.term, d.config_index)
            }
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<6} {:<13} {:<7} {:<5} {:<8} {:<7} {}",
            shard.shard, voters, leader, shard.term, shard.last_applied_index, asleep, record
        );
    }
    if let Some(routes) = &status.routes {
        let _ = writeln!(
            out,
            "\nroutes (node {}): cache hits {}, misses {}, corrections {}, epoch hints {}, DHT lookups {} (found {}), meta fallbacks {}",
            status.answered_by,
            routes.cache_hits,
            routes.cache_misses,
            routes.corrections,
            routes.epoch_hints,
            routes.dht_lookups,
            routes.dht_found,
            routes.meta_fallbacks
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use palaver_proto::v1::{NodeStatus, StatusResponse};

    use super::{status_json, status_table};

    #[test]
    fn status_shows_each_nodes_addresses_and_a_dash_for_no_http() {
        let node = |id: u64, http: &str| NodeStatus {
            node_id: id,
            grpc_addr: format!("127.0.0.1:710{id}"),
            http_addr: http.to_owned(),
            reachable: true,
            ..Default::default()
        };
        let status = StatusResponse {
            cluster_id: "c".to_owned(),
            answered_by: 1,
            nodes: vec![node(1, "127.0.0.1:8101"), node(2, "")],
            ..Default::default()
        };
        let table = status_table(&status);
        let rows: Vec<Vec<&str>> =
            table.lines().filter(|l| l.starts_with(['1', '2'])).map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0][..4], ["1", "127.0.0.1:7101", "127.0.0.1:8101", "yes"], "{table}");
        assert_eq!(rows[1][..4], ["2", "127.0.0.1:7102", "-", "yes"], "{table}");
        let json = status_json(&status);
        assert_eq!(json["nodes"][0]["http_addr"], "127.0.0.1:8101");
        assert_eq!(json["nodes"][1]["http_addr"], "");
    }
}
