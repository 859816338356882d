//! `palaver bench raft`: consensus writes (room joins and leaves, each one Raft commit fsynced on
//! a majority) and commits/s and latency percentiles for each concurrency level. Each client is
//! its own user with one write in flight, sent on its own `ChatService.Pipeline` stream (or as
//! unary calls with `--unary`), to one node — or, with `--to-leader`, to whichever node leads
//! the room's shard.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args;
use palaver_proto::v1::admin_service_client::AdminServiceClient;
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{CreateRoomRequest, RoomRequest, StatusRequest, pipeline_reply, pipeline_request};
use tonic::transport::Channel;

use super::{Cluster, ClusterArgs, CpuMeter, Pipeline, authed, authed_status, login, quantile_ms, setup_call};

#[derive(Debug, Args)]
pub struct RaftBenchArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Concurrent clients, one run per value.
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rooms written to (spread over the shards).
    #[arg(long, default_value_t = 256)]
    rooms: usize,
    /// First gRPC port of the cluster the bench starts.
    #[arg(long, default_value_t = 7301)]
    base_port: u16,
    /// One unary call per write instead of each client's `Pipeline` stream.
    #[arg(long)]
    unary: bool,
    /// Send each write to the node that leads its room's shard (learned once from
    /// `AdminService.Status`; the room's shard from the hash ring), as a leader-aware client
    /// library would, instead of to the client's one node (which forwards two writes in three).
    #[arg(long)]
    to_leader: bool,
}

pub async fn run(args: RaftBenchArgs) -> anyhow::Result<()> {
    let cluster = Cluster::open(&args.cluster, args.base_port).await?;
    let addrs = cluster.addrs.clone();
    let channels = cluster.channels()?;
    let mut setup = ChatServiceClient::new(channels[0].clone());
    let owner = login(&mut setup, "bench-owner").await?;
    let run_id = std::process::id();
    let rooms: Vec<String> = (0..args.rooms).map(|i| format!("bench-{run_id}-{i}")).collect();
    for room in &rooms {
        let request = CreateRoomRequest { room: room.clone(), ..Default::default() };
        setup_call(&format!("create {room}"), || {
            let (mut client, request) = (setup.clone(), authed_status(request.clone(), &owner));
            async move { client.create_room(request?).await }
        })
        .await?;
    }
    // Which node (index into `channels`) leads each room's shard, for --to-leader.
    let leader_of_room: Vec<usize> = if args.to_leader { leaders_of(&addrs, &rooms).await? } else { Vec::new() };
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "clients", "commits/s", "p50 ms", "p99 ms", "errors", "node cpu µs/c", "bench cpu µs/c"
    );
    for &clients in &args.clients {
        // Log every client in first (argon2 is slow on purpose), then start the clock.
        let mut clients_ready = Vec::with_capacity(clients);
        for c in 0..clients {
            let mut client = ChatServiceClient::new(channels[c % channels.len()].clone());
            let token = login(&mut client, &format!("bench-{c}")).await?;
            // One writer per node with --to-leader, else one to this client's node.
            let mut writers = Vec::new();
            let targets: Vec<usize> =
                if args.to_leader { (0..channels.len()).collect() } else { vec![c % channels.len()] };
            for node in targets {
                let client = ChatServiceClient::new(channels[node].clone());
                writers.push(Writer::open(client, token.clone(), args.unary).await?);
            }
            clients_ready.push((c, writers));
        }
        let mut tasks = Vec::new();
        let cpu = CpuMeter::start(&cluster);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(args.seconds);
        for (c, mut writers) in clients_ready {
            let rooms = rooms.clone();
            let leader_of_room = leader_of_room.clone();
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = Vec::new();
                let mut i = c;
                while Instant::now() < deadline {
                    let room = rooms[i % rooms.len()].clone();
                    let writer = match leader_of_room.get(i % rooms.len()) {
                        Some(node) => &mut writers[*node],
                        None => &mut writers[0],
                    };
                    i += clients.max(1);
                    for join in [true, false] {
                        let started = Instant::now();
                        match writer.membership(&room, join).await {
                            Ok(()) => latencies.push(started.elapsed()),
                            Err(error) => errors.push(error),
                        }
                    }
                }
                anyhow::Ok((latencies, errors))
            }));
        }
        let mut latencies = Vec::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for task in tasks {
            let (l, e) = task.await??;
            latencies.extend(l);
            for error in e {
                *errors.entry(error).or_default() += 1;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let [node_cpu, bench_cpu] = cpu.per(&cluster, latencies.len());
        latencies.sort();
        println!(
            "{clients:>8} {:>12.0} {:>10.2} {:>10.2} {:>10} {:>14} {:>14}",
            latencies.len() as f64 / elapsed,
            quantile_ms(&latencies, 0.50),
            quantile_ms(&latencies, 0.99),
            errors.values().sum::<usize>(),
            node_cpu,
            bench_cpu,
        );
        for (error, count) in &errors {
            println!("         {count} x {error}");
        }
    }
    cluster.stop().await;
    Ok(())
}

/// For each room, the index in `addrs` of the node leading its shard.
async fn leaders_of(addrs: &[String], rooms: &[String]) -> anyhow::Result<Vec<usize>> {
    let mut admin = AdminServiceClient::connect(format!("http://{}", addrs[0])).await?;
    let status = admin.status(StatusRequest {}).await?.into_inner();
    let shard_count = u32::try_from(status.shards.iter().filter(|s| s.shard != 0).count())?;
    let ring = palaver_router::ShardRing::new(shard_count.max(1));
    rooms
        .iter()
        .map(|room| {
            let shard = ring.shard_of_room(&palaver_ids::RoomId(room.clone()));
            let leader = status.shards.iter().find(|s| s.shard == shard.0).map_or(0, |s| s.leader);
            let addr = status.nodes.iter().find(|n| n.node_id == leader).map(|n| n.grpc_addr.clone());
            Ok(addr.and_then(|addr| addrs.iter().position(|a| *a == addr)).unwrap_or(0))
        })
        .collect()
}

/// One bench client's way of writing: its own `Pipeline` stream, or unary calls.
enum Writer {
    Pipeline(Pipeline),
    Unary { client: ChatServiceClient<Channel>, token: String },
}

impl Writer {
    async fn open(client: ChatServiceClient<Channel>, token: String, unary: bool) -> anyhow::Result<Self> {
        if unary {
            return Ok(Writer::Unary { client, token });
        }
        Ok(Writer::Pipeline(Pipeline::open(client, &token).await?))
    }

    /// Join (or leave) `room`; an error comes back as its text.
    async fn membership(&mut self, room: &str, join: bool) -> Result<(), String> {
        let request = RoomRequest { room: room.to_owned() };
        match self {
            Writer::Unary { client, token } => {
                let request = authed(request, token).map_err(|e| e.to_string())?;
                let result = if join { client.join(request).await } else { client.leave(request).await };
                result.map(|_| ()).map_err(|status| format!("{}: {}", status.code(), status.message()))
            }
            Writer::Pipeline(pipeline) => {
                let op = if join { pipeline_request::Op::Join(request) } else { pipeline_request::Op::Leave(request) };
                match pipeline.call(op).await? {
                    pipeline_reply::Result::Error(e) => Err(format!("{}: {}", e.code, e.message)),
                    _ => Ok(()),
                }
            }
        }
    }
}
