//! `palaver node`: run one node until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use palaver_node::{Bootstrap, Node, NodeConfig, NodeEnv};
use palaver_shard::{ReplicaOptions, RocksEngine};

#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Directory for this node's RocksDB (created if missing).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to serve gRPC on (clients and peers), e.g. 127.0.0.1:7101.
    #[arg(long)]
    grpc_addr: String,
    /// Address peers and clients should use, if not --grpc-addr.
    #[arg(long)]
    advertise_addr: Option<String>,
    /// Create a new cluster (first node only, first start only).
    #[arg(long, conflicts_with = "join")]
    init_cluster: bool,
    /// Number of data shards of the new cluster (with --init-cluster).
    #[arg(long, default_value_t = 64, requires = "init_cluster")]
    shards: u32,
    /// Join the cluster of a running node, given by its gRPC address (HOST:PORT) or its
    /// libp2p multiaddr (/ip4/…/tcp/…/p2p/PEER_ID) (first start only).
    #[arg(long)]
    join: Option<String>,
    /// Where the libp2p swarm (the DHT) listens, as a multiaddr; default: the gRPC address's IP
    /// on a free port.
    #[arg(long)]
    p2p_addr: Option<String>,
    /// Address to serve HTTP on (the web page, WebSocket at /ws, the HTTP API under /api/v1/,
    /// /healthz, /readyz, /metrics), e.g. 127.0.0.1:8101. None if left out.
    #[arg(long)]
    http_addr: Option<String>,
    /// Another origin (scheme://host:port) whose pages may open WebSockets here; repeat for
    /// more; `*` allows any. A page served by the node itself is always allowed.
    #[arg(long = "allow-origin")]
    allow_origins: Vec<String>,
    /// Most WebSocket connections open at once from one IP address.
    #[arg(long, default_value_t = palaver_node::http::CONNECTIONS_PER_ADDRESS_DEFAULT)]
    ws_connections_per_address: usize,
    /// Most gRPC connections open at once from one IP address (past that, calls get
    /// `limit_reached`).
    #[arg(long, default_value_t = palaver_node::connections::GRPC_CONNECTIONS_PER_ADDRESS_DEFAULT)]
    grpc_connections_per_address: usize,
    /// Snapshot a shard (and purge its log) after this many entries.
    #[arg(long, default_value_t = palaver_shard::replica::SNAPSHOT_LOGS_SINCE_LAST_DEFAULT)]
    snapshot_logs: u64,
}

pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    super::init_tracing();
    // Every client connection holds a file descriptor: allow as many as the hard limit does.
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    std::fs::create_dir_all(&args.data_dir).with_context(|| format!("create {}", args.data_dir.display()))?;
    let engine = Arc::new(RocksEngine::open(&args.data_dir.join("db"))?);
    let listener =
        tokio::net::TcpListener::bind(&args.grpc_addr).await.with_context(|| format!("bind {}", args.grpc_addr))?;
    let bootstrap = match (args.init_cluster, args.join) {
        (true, _) => Bootstrap::InitCluster { shard_count: args.shards },
        (false, Some(seed)) => Bootstrap::Join { seed },
        (false, None) => Bootstrap::Resume,
    };
    let advertise_addr = match args.advertise_addr {
        Some(addr) => addr,
        None => listener.local_addr()?.to_string(),
    };
    let p2p_listen = match args.p2p_addr {
        Some(addr) => addr,
        None => {
            let ip = listener.local_addr()?.ip();
            let family = if ip.is_ipv4() { "ip4" } else { "ip6" };
            format!("/{family}/{ip}/tcp/0")
        }
    };
    let config = NodeConfig {
        data_dir: args.data_dir,
        advertise_addr,
        bootstrap,
        replica: ReplicaOptions { snapshot_logs_since_last: args.snapshot_logs.max(1) },
        p2p_listen: Some(p2p_listen),
        http: args.http_addr.map(|listen| palaver_node::http::HttpOptions {
            listen,
            allowed_origins: args.allow_origins,
            connections_per_address: args.ws_connections_per_address,
        }),
        grpc_connections_per_address: args.grpc_connections_per_address,
    };
    let node = Node::start(config, NodeEnv::default(), engine, listener).await?;
    println!("node {} serving on {}", node.id(), node.local_addr());
    if let Some(addr) = &node.inner().http_addr {
        println!("node {} http http://{addr}/", node.id());
    }
    for addr in node.inner().directory.p2p_addrs() {
        println!("node {} p2p {addr}", node.id());
    }
    wait_for_signal().await;
    node.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
