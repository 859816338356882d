//! `palaver bench posts`: the CRDT plane under load.
//!
//! Many users post into many rooms with ack `quorum` (fsynced on two replicas before the
//! answer) while subscribers receive every room, and the bench prints posts/s, ack latency,
//! delivery latency (post sent to event received, every subscriber) and what never arrived.
//!
//! - Each posting user posts into one room, on its own `Pipeline` stream to one node, and
//!   paces itself under the node's per-user write limit; `--in-flight` writers (one post in
//!   flight each) share the users round-robin. With `--rate` the writers post on a schedule
//!   instead of as fast as they can.
//! - Each subscriber is one user, a member of every room, with one `SubscribeRooms` stream
//!   carrying all its rooms on one node (subscribers are spread over the nodes; with `--attach`
//!   other than `any`, one stream per node it attaches to), or with `--subscribe each` one
//!   `Subscribe` stream per room. A subscription that ends or a stream that breaks is resumed
//!   from its version vector.
//! - A body carries its run, send time, user and sequence number, so each delivery is timed and
//!   checked off. After a run the bench waits (up to [`DRAIN_DEADLINE_MS`]) until every
//!   subscriber holds every acknowledged post; what is still absent is reported as missing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{
    AckLevel, CreateRoomRequest, MessageEventKind, PostRequest, RoomRequest, RoomSubscription, SubscribeRequest,
    SubscribeRoomsRequest, VersionVector, pipeline_reply, pipeline_request, room_event, room_subscription_event,
};
use tonic::transport::Channel;

use super::{
    Cluster, ClusterArgs, CpuMeter, Pipeline, WalMeter, authed, authed_status, login, median, quantile_ms, setup_call,
};

/// Most gRPC streams the bench opens on one connection (servers cap concurrent streams).
pub const STREAMS_PER_CONNECTION_MAX: usize = 100;
/// Each posting user posts at most this often (the node allows 20 writes/s per user).
pub const USER_POST_INTERVAL_MS: u64 = 53;
/// How long after a run the bench waits for subscribers to receive every acknowledged post.
pub const DRAIN_DEADLINE_MS: u64 = 30_000;
/// Most logins and joins in flight during setup.
pub const SETUP_IN_FLIGHT_MAX: usize = 32;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Ack {
    /// Durable on two of the shard's three replicas.
    Quorum,
    /// Durable on the accepting replica.
    One,
}

/// Which nodes clients attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Attach {
    /// Spread over all nodes.
    Any,
    /// Only nodes that hold a replica of the client's room.
    Replica,
    /// Only nodes that hold none (every operation takes the extra hop to a replica; needs at
    /// least 4 nodes).
    NonReplica,
    /// `replica` and `non-replica` in turns (ABBA over the rounds) on the same cluster and
    /// users; prints what the hop costs (needs at least 4 nodes).
    Compare,
}

/// How subscribers receive their rooms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SubscribeWith {
    /// One `SubscribeRooms` stream per subscriber and node, carrying all its rooms there.
    Rooms,
    /// One `Subscribe` stream per subscriber and room.
    Each,
}

#[derive(Debug, Args)]
pub struct PostsBenchArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Posts in flight (writers with one post in flight each), one run per value.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    in_flight: Vec<usize>,
    /// Post at this many posts/s in total instead of as fast as the writers can.
    #[arg(long)]
    rate: Option<u64>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Rooms posted to (spread over the shards).
    #[arg(long, default_value_t = 256)]
    rooms: usize,
    /// Posting users; each posts into one room, at most every 53 ms.
    #[arg(long, default_value_t = 2048)]
    users: usize,
    /// Subscribers, each subscribed to every room.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// How each subscriber receives its rooms: `rooms`, one `SubscribeRooms` stream per node
    /// it attaches to (as a chat client would); `each`, one `Subscribe` stream per room.
    #[arg(long, value_enum, default_value_t = SubscribeWith::Rooms)]
    subscribe: SubscribeWith,
    /// Acknowledgement level of each post.
    #[arg(long, value_enum, default_value_t = Ack::Quorum)]
    ack: Ack,
    /// Bytes per message body.
    #[arg(long, default_value_t = 200)]
    body_bytes: usize,
    /// First gRPC port of the cluster the bench starts.
    #[arg(long, default_value_t = 7401)]
    base_port: u16,
    /// First HTTP port of the cluster the bench starts (read for its WAL fsync counters).
    #[arg(long, default_value_t = 8401)]
    http_base_port: u16,
    /// Which nodes posting users and subscribers attach to.
    #[arg(long, value_enum, default_value_t = Attach::Any)]
    attach: Attach,
    /// Rounds of runs (each round runs every `--in-flight` value, and with `--attach compare`
    /// both attachments); with more than one, medians are printed at the end.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
}

/// For each room, the nodes (indexes into `addrs`) its clients may attach to.
async fn attachable(addrs: &[String], rooms: &[String], attach: Attach) -> anyhow::Result<Vec<Vec<usize>>> {
    let all: Vec<usize> = (0..addrs.len()).collect();
    if attach == Attach::Any {
        return Ok(vec![all; rooms.len()]);
    }
    let status = crate::cli::admin::fetch_status(&addrs[0]).await?;
    let shard_count = u32::try_from(status.shards.len().saturating_sub(1))?;
    let ring = palaver_router::ShardRing::new(shard_count.max(1));
    let index_of = |node_id: u64| {
        let addr = status.nodes.iter().find(|n| n.node_id == node_id).map(|n| n.grpc_addr.clone());
        addr.and_then(|addr| addrs.iter().position(|a| *a == addr))
    };
    rooms
        .iter()
        .map(|room| {
            let shard = ring.shard_of_room(&palaver_ids::RoomId(room.clone())).0;
            let voters = status.shards.iter().find(|s| s.shard == shard).map(|s| s.voters.clone()).unwrap_or_default();
            let replicas: Vec<usize> = voters.iter().filter_map(|id| index_of(*id)).collect();
            let chosen: Vec<usize> = match attach {
                Attach::Replica => replicas,
                _ => all.iter().copied().filter(|i| !replicas.contains(i)).collect(),
            };
            anyhow::ensure!(!chosen.is_empty(), "no node fits --attach {attach:?} for room {room} (shard {shard})");
            Ok(chosen)
        })
        .collect()
}

/// Channels to the nodes, a new connection every [`STREAMS_PER_CONNECTION_MAX`] streams.
struct Connections {
    addrs: Vec<String>,
    /// Per node: the newest connection and how many streams it carries.
    open: Vec<Option<(Channel, usize)>>,
}

impl Connections {
    fn new(addrs: &[String]) -> Self {
        Self { addrs: addrs.to_vec(), open: vec![None; addrs.len()] }
    }

    /// A channel to node `node` (index into the addresses) with room for one more stream.
    fn for_stream(&mut self, node: usize) -> anyhow::Result<Channel> {
        let node = node % self.addrs.len();
        let slot = &mut self.open[node];
        match slot {
            Some((channel, streams)) if *streams < STREAMS_PER_CONNECTION_MAX => {
                *streams += 1;
                Ok(channel.clone())
            }
            _ => {
                let channel = Channel::from_shared(format!("http://{}", self.addrs[node]))?.connect_lazy();
                *slot = Some((channel.clone(), 1));
                Ok(channel)
            }
        }
    }
}

/// A posting user: its room, its own Pipeline stream, and when it may post again.
struct Poster {
    user: u32,
    room: String,
    pipeline: Pipeline,
    next_post_at: Instant,
}

impl Poster {
    /// Post; a refusal comes back as its error code.
    async fn post(&mut self, body: String, client_message_id: String, ack: AckLevel) -> Result<(), String> {
        let post = PostRequest { room: self.room.clone(), body, client_message_id, ack: ack as i32, seen: None };
        match self.pipeline.call(pipeline_request::Op::Post(post)).await? {
            pipeline_reply::Result::Error(e) => Err(e.code),
            _ => Ok(()),
        }
    }
}

/// What one subscription received, by run: each post's key and its delivery latency in µs.
type Received = Mutex<HashMap<u32, Vec<(u64, u32)>>>;

/// What the subscriptions received, for the runs to count.
#[derive(Default)]
struct Deliveries {
    /// Per subscription (index), per run: the keys received and each one's latency.
    received: Vec<Received>,
    /// Deliveries of the current run, all subscriptions together.
    count: AtomicU64,
    /// The run being counted.
    run: AtomicU64,
    /// Subscriptions that have caught up with their room.
    caught_up: AtomicUsize,
    /// Streams that broke and were resumed.
    resumed: AtomicU64,
    /// Per subscription (index): its version vector, kept when its subscriber moves to
    /// another node (`--attach compare`).
    have: Vec<Mutex<BTreeMap<u64, u64>>>,
}

/// The key of a post: its user and sequence number.
pub(super) fn key(user: u32, seq: u32) -> u64 {
    (u64::from(user) << 32) | u64::from(seq)
}

/// A body: `bench <run> <sent µs> <user> <seq> ` padded to `bytes` with `x`.
pub(super) fn body(run: u32, sent_us: u64, user: u32, seq: u32, bytes: usize) -> String {
    let mut body = format!("bench {run} {sent_us} {user} {seq} ");
    while body.len() < bytes {
        body.push('x');
    }
    body
}

/// (run, sent µs, key) of a bench body.
pub(super) fn parse_body(body: &str) -> Option<(u32, u64, u64)> {
    let mut words = body.split(' ');
    if words.next()? != "bench" {
        return None;
    }
    let run = words.next()?.parse().ok()?;
    let sent = words.next()?.parse().ok()?;
    let user = words.next()?.parse().ok()?;
    let seq = words.next()?.parse().ok()?;
    Some((run, sent, key(user, seq)))
}

/// Record one event of subscription `index` (`first`: its first `caught_up` is still to come).
fn record(deliveries: &Deliveries, index: usize, epoch: Instant, event: room_event::Event, first: &mut bool) {
    let Some(have) = deliveries.have.get(index) else { return };
    match event {
        room_event::Event::CaughtUp(_) if *first => {
            *first = false;
            deliveries.caught_up.fetch_add(1, Ordering::Relaxed);
        }
        room_event::Event::Message(event) => {
            if let Some(position) = &event.position {
                let mut have = lock(have);
                let counter = have.entry(position.replica).or_default();
                *counter = (*counter).max(position.counter);
            }
            if event.kind != MessageEventKind::Posted as i32 {
                return;
            }
            let Some((run, sent_us, key)) = event.message.as_ref().and_then(|m| parse_body(&m.body)) else {
                return;
            };
            let latency_us =
                u32::try_from((epoch.elapsed().as_micros() as u64).saturating_sub(sent_us)).unwrap_or(u32::MAX);
            if let Some(slot) = deliveries.received.get(index) {
                lock(slot).entry(run).or_default().push((key, latency_us));
            }
            if u64::from(run) == deliveries.run.load(Ordering::Relaxed) {
                deliveries.count.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {}
    }
}

/// The version vector subscription `index` holds.
fn held(deliveries: &Deliveries, index: usize) -> VersionVector {
    let entries = deliveries.have.get(index).map(|have| lock(have).iter().map(|(r, c)| (*r, *c)).collect());
    VersionVector { entries: entries.unwrap_or_default() }
}

/// How long a subscriber waits before it resubscribes.
const RESUME_PAUSE: Duration = Duration::from_millis(100);

/// The stream a subscribe call opened, or `None` after [`RESUME_PAUSE`] (the caller retries).
async fn opened<T>(call: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> Option<tonic::Streaming<T>> {
    match call {
        Ok(stream) => Some(stream.into_inner()),
        Err(_) => {
            tokio::time::sleep(RESUME_PAUSE).await;
            None
        }
    }
}

/// Follow one room for one subscriber on a `Subscribe` stream of its own, recording every
/// bench post into slot `index`.
async fn follow(
    channel: Channel,
    token: String,
    room: String,
    index: usize,
    epoch: Instant,
    deliveries: Arc<Deliveries>,
) {
    let mut client = ChatServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut first = true;
    loop {
        let request = SubscribeRequest { room: room.clone(), version_vector: Some(held(&deliveries, index)) };
        let stream = match authed(request, &token) {
            Ok(request) => client.subscribe(request).await,
            Err(_) => return,
        };
        let Some(mut stream) = opened(stream).await else { continue };
        while let Ok(Some(event)) = stream.message().await {
            if let Some(event) = event.event {
                record(&deliveries, index, epoch, event, &mut first);
            }
        }
        deliveries.resumed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(RESUME_PAUSE).await;
    }
}

/// Follow many rooms for one subscriber on one `SubscribeRooms` stream: `rooms` holds each
/// room and its slot; the subscription's id is its place in `rooms`.
async fn follow_rooms(
    channel: Channel,
    token: String,
    rooms: Vec<(String, usize)>,
    epoch: Instant,
    deliveries: Arc<Deliveries>,
) {
    let mut client = ChatServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut first = vec![true; rooms.len()];
    let start = |id: usize, deliveries: &Deliveries| {
        let (room, index) = &rooms[id];
        RoomSubscription { id: id as u64, room: room.clone(), version_vector: Some(held(deliveries, *index)) }
    };
    loop {
        let (control, requests) = tokio::sync::mpsc::channel::<SubscribeRoomsRequest>(16);
        let starts = (0..rooms.len()).map(|id| start(id, &deliveries)).collect();
        if control.send(SubscribeRoomsRequest { start: starts, stop: Vec::new() }).await.is_err() {
            return;
        }
        let stream = match authed(tokio_stream::wrappers::ReceiverStream::new(requests), &token) {
            Ok(request) => client.subscribe_rooms(request).await,
            Err(_) => return,
        };
        let Some(mut stream) = opened(stream).await else { continue };
        while let Ok(Some(reply)) = stream.message().await {
            for event in reply.events {
                let Ok(id) = usize::try_from(event.id) else { continue };
                let (Some((_, index)), Some(first)) = (rooms.get(id), first.get_mut(id)) else { continue };
                match event.body {
                    Some(room_subscription_event::Body::Event(event)) => {
                        if let Some(event) = event.event {
                            record(&deliveries, *index, epoch, event, first);
                        }
                    }
                    Some(room_subscription_event::Body::End(_)) => {
                        // Resume this room alone, from what it holds.
                        deliveries.resumed.fetch_add(1, Ordering::Relaxed);
                        let (control, again) = (control.clone(), start(id, &deliveries));
                        tokio::spawn(async move {
                            tokio::time::sleep(RESUME_PAUSE).await;
                            let _ = control.send(SubscribeRoomsRequest { start: vec![again], stop: Vec::new() }).await;
                        });
                    }
                    None => {}
                }
            }
        }
        deliveries.resumed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(RESUME_PAUSE).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run `f` over `items` with at most [`SETUP_IN_FLIGHT_MAX`] in flight.
async fn bounded<T, F, Fut, R>(items: Vec<T>, f: F) -> anyhow::Result<Vec<R>>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<R>>,
{
    use futures::StreamExt;
    futures::stream::iter(items.into_iter().map(f))
        .buffered(SETUP_IN_FLIGHT_MAX)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

pub async fn run(args: PostsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.users > 0 && args.rooms > 0, "--users and --rooms must be positive");
    let cluster = Cluster::open_with(&args.cluster, args.base_port, Some(args.http_base_port), Vec::new()).await?;
    let channels = cluster.channels()?;
    let nodes = channels.len();
    let run_id = std::process::id();
    let ack = match args.ack {
        Ack::Quorum => AckLevel::Quorum,
        Ack::One => AckLevel::One,
    };

    // Rooms, posting users (each a member of its one room), subscribers (members of all).
    let mut setup = ChatServiceClient::new(channels[0].clone());
    let owner = login(&mut setup, "bench-owner").await?;
    let rooms: Vec<String> = (0..args.rooms).map(|i| format!("posts-{run_id}-{i}")).collect();
    println!("setup: {} rooms, {} posting users, {} subscribers", args.rooms, args.users, args.subscribers);
    bounded(rooms.clone(), |room| {
        let client = setup.clone();
        let owner = owner.clone();
        async move {
            let request = CreateRoomRequest { room: room.clone(), ..Default::default() };
            setup_call(&format!("create {room}"), || {
                let (mut client, request) = (client.clone(), authed_status(request.clone(), &owner));
                async move { client.create_room(request?).await }
            })
            .await?;
            anyhow::Ok(())
        }
    })
    .await?;
    let modes = match args.attach {
        Attach::Compare => vec![Attach::Replica, Attach::NonReplica],
        one => vec![one],
    };
    let mut attachments = Vec::with_capacity(modes.len());
    for mode in &modes {
        attachments.push(attachable(&cluster.addrs, &rooms, *mode).await?);
    }
    let members: Vec<(String, Vec<String>, usize)> = (0..args.users)
        .map(|u| (format!("bp-{run_id}-{u}"), vec![rooms[u % rooms.len()].clone()], u % nodes))
        .chain((0..args.subscribers).map(|k| (format!("bs-{run_id}-{k}"), rooms.clone(), k % nodes)))
        .collect();
    let tokens: Vec<String> = bounded(members.clone(), |(user, rooms, node)| {
        let mut client = ChatServiceClient::new(channels[node].clone());
        async move {
            let token = login(&mut client, &user).await?;
            for room in rooms {
                setup_call(&format!("{user} joins {room}"), || {
                    let request = authed_status(RoomRequest { room: room.clone() }, &token);
                    let mut client = client.clone();
                    async move { client.join(request?).await }
                })
                .await?;
            }
            anyhow::Ok(token)
        }
    })
    .await?;

    let epoch = Instant::now();
    let subscriptions = args.subscribers * rooms.len();
    let deliveries = Arc::new(Deliveries {
        received: (0..subscriptions).map(|_| Mutex::new(HashMap::new())).collect(),
        have: (0..subscriptions).map(|_| Mutex::new(BTreeMap::new())).collect(),
        ..Default::default()
    });
    let mut followers: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let mut posters: Vec<Poster> = Vec::with_capacity(args.users);
    let mut attached: Option<usize> = None;
    // Compared attachments alternate ABBA (every other round starts with the second), so that
    // the host's drift over a long run (other tenants' load) does not favour either.
    let runs: Vec<(usize, usize)> = (0..args.rounds.max(1))
        .flat_map(|round| {
            let order: Vec<usize> =
                if round % 2 == 1 { (0..modes.len()).rev().collect() } else { (0..modes.len()).collect() };
            order.into_iter().flat_map(|mode| args.in_flight.iter().map(move |n| (mode, *n)))
        })
        .collect();
    let mut results: Vec<RunResult> = Vec::with_capacity(runs.len());
    println!(
        "{:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8} {:>7} {:>14} {:>14} {:>11} {:>12}",
        "in-flight",
        "posts/s",
        "ack p50",
        "ack p99",
        "deliv/s",
        "deliv p50",
        "deliv p99",
        "missing",
        "errors",
        "node cpu µs/p",
        "bench cpu µs/p",
        "fsyncs/post",
        "writes/fsync"
    );
    let mut sequence = 0u32;
    for (run, &(mode, in_flight)) in runs.iter().enumerate() {
        let run = u32::try_from(run)? + 1;
        if attached != Some(mode) {
            // (Re)attach the subscribers, caught up before the run, and the posting users.
            attached = Some(mode);
            let attach = &attachments[mode];
            for follower in followers.drain(..) {
                follower.abort();
            }
            deliveries.caught_up.store(0, Ordering::Relaxed);
            let mut connections = Connections::new(&cluster.addrs);
            for k in 0..args.subscribers {
                let token = tokens[args.users + k].clone();
                let mut by_node: BTreeMap<usize, Vec<(String, usize)>> = BTreeMap::new();
                for (r, room) in rooms.iter().enumerate() {
                    let node = attach[r][k % attach[r].len()];
                    by_node.entry(node).or_default().push((room.clone(), k * rooms.len() + r));
                }
                for (node, rooms) in by_node {
                    match args.subscribe {
                        SubscribeWith::Rooms => {
                            let channel = connections.for_stream(node)?;
                            let task = follow_rooms(channel, token.clone(), rooms, epoch, deliveries.clone());
                            followers.push(tokio::spawn(task));
                        }
                        SubscribeWith::Each => {
                            for (room, index) in rooms {
                                let channel = connections.for_stream(node)?;
                                let task = follow(channel, token.clone(), room, index, epoch, deliveries.clone());
                                followers.push(tokio::spawn(task));
                            }
                        }
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while deliveries.caught_up.load(Ordering::Relaxed) < subscriptions {
                anyhow::ensure!(Instant::now() < deadline, "subscriptions did not catch up within 60 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let next_post_at: Vec<Instant> = posters.iter().map(|p| p.next_post_at).collect();
            posters.clear();
            for (u, token) in tokens.iter().take(args.users).enumerate() {
                let room = u % rooms.len();
                let node = attach[room][(u / rooms.len()) % attach[room].len()];
                let client = ChatServiceClient::new(connections.for_stream(node)?);
                posters.push(Poster {
                    user: u32::try_from(u)?,
                    room: rooms[u % rooms.len()].clone(),
                    pipeline: Pipeline::open(client, token).await?,
                    next_post_at: next_post_at.get(u).copied().unwrap_or_else(Instant::now),
                });
            }
            if modes.len() > 1 {
                println!("-- attach {}", attach_name(modes[mode]));
            }
        }
        let in_flight = in_flight.clamp(1, posters.len());
        deliveries.run.store(u64::from(run), Ordering::Relaxed);
        deliveries.count.store(0, Ordering::Relaxed);
        // Deal the users to the writers round-robin.
        let mut hands: Vec<Vec<Poster>> = (0..in_flight).map(|_| Vec::new()).collect();
        for (i, poster) in posters.drain(..).enumerate() {
            hands[i % in_flight].push(poster);
        }
        let wal = WalMeter::start(&cluster).await;
        let cpu = CpuMeter::start(&cluster);
        let started = Instant::now();
        let stop_at = started + Duration::from_secs(args.seconds);
        let interval = args.rate.map(|rate| Duration::from_secs_f64(in_flight as f64 / rate.max(1) as f64));
        let mut writers = Vec::new();
        for (w, mut hand) in hands.into_iter().enumerate() {
            let body_bytes = args.body_bytes;
            let first_seq = sequence;
            writers.push(tokio::spawn(async move {
                let mut acked: Vec<(usize, u64)> = Vec::new();
                let mut latencies = Vec::new();
                let mut errors: BTreeMap<String, usize> = BTreeMap::new();
                let mut seq = first_seq;
                let mut next_at = started + interval.map_or(Duration::ZERO, |i| i.mul_f64(w as f64 / in_flight as f64));
                let mut turn = 0usize;
                loop {
                    let users = hand.len();
                    let poster = &mut hand[turn % users];
                    turn += 1;
                    let at = next_at.max(poster.next_post_at);
                    if at >= stop_at {
                        break;
                    }
                    tokio::time::sleep_until(at.into()).await;
                    if let Some(interval) = interval {
                        next_at += interval;
                    }
                    poster.next_post_at = Instant::now() + Duration::from_millis(USER_POST_INTERVAL_MS);
                    seq += 1;
                    let sent = Instant::now();
                    let sent_us = sent.duration_since(epoch).as_micros() as u64;
                    let text = body(run, sent_us, poster.user, seq, body_bytes);
                    match poster.post(text, format!("{run}-{seq}"), ack).await {
                        Ok(()) => {
                            latencies.push(sent.elapsed());
                            acked.push((poster.user as usize, key(poster.user, seq)));
                        }
                        Err(error) => *errors.entry(error).or_default() += 1,
                    }
                }
                (hand, acked, latencies, errors)
            }));
            sequence = sequence.wrapping_add(1 << 24);
        }
        let mut acked_by_room: HashMap<usize, Vec<u64>> = HashMap::new();
        let mut latencies = Vec::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        for writer in writers {
            let (hand, acked, l, e) = writer.await?;
            posters.extend(hand);
            for (user, key) in acked {
                acked_by_room.entry(user % rooms.len()).or_default().push(key);
            }
            latencies.extend(l);
            for (error, count) in e {
                *errors.entry(error).or_default() += count;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        posters.sort_by_key(|p| p.user);

        // Wait until every subscriber holds every acknowledged post (or the deadline).
        let acked_total: u64 = acked_by_room.values().map(|keys| keys.len() as u64).sum();
        let expected = acked_total * args.subscribers as u64;
        let drain_deadline = Instant::now() + Duration::from_millis(DRAIN_DEADLINE_MS);
        while deliveries.count.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut delivery_latencies = Vec::new();
        let mut missing = 0u64;
        let mut duplicates = 0u64;
        for k in 0..args.subscribers {
            for (r, _) in rooms.iter().enumerate() {
                let slot = &deliveries.received[k * rooms.len() + r];
                let got = lock(slot).remove(&run).unwrap_or_default();
                let mut seen = HashSet::with_capacity(got.len());
                for (key, latency_us) in got {
                    if seen.insert(key) {
                        delivery_latencies.push(Duration::from_micros(u64::from(latency_us)));
                    } else {
                        duplicates += 1;
                    }
                }
                let acked = acked_by_room.get(&r).map_or(&[][..], |v| &v[..]);
                missing += acked.iter().filter(|key| !seen.contains(key)).count() as u64;
            }
        }
        latencies.sort();
        delivery_latencies.sort();
        // Per acknowledged post, the deliveries to subscribers included.
        let [node_cpu, bench_cpu] = cpu.per(&cluster, latencies.len());
        let [fsyncs_per_post, writes_per_fsync] = wal.per(&cluster, latencies.len()).await;
        results.push(RunResult {
            mode,
            in_flight,
            posts_per_s: latencies.len() as f64 / elapsed,
            ack_p50_ms: quantile_ms(&latencies, 0.50),
            delivery_p50_ms: quantile_ms(&delivery_latencies, 0.50),
            node_cpu_us: node_cpu.parse().ok(),
        });
        println!(
            "{:>9} {:>9.0} {:>9.2} {:>9.2} {:>10.0} {:>10.2} {:>10.2} {:>8} {:>7} {:>14} {:>14} {:>11} {:>12}",
            in_flight,
            latencies.len() as f64 / elapsed,
            quantile_ms(&latencies, 0.50),
            quantile_ms(&latencies, 0.99),
            delivery_latencies.len() as f64 / elapsed,
            quantile_ms(&delivery_latencies, 0.50),
            quantile_ms(&delivery_latencies, 0.99),
            missing,
            errors.values().sum::<usize>(),
            node_cpu,
            bench_cpu,
            fsyncs_per_post,
            writes_per_fsync,
        );
        for (error, count) in &errors {
            println!("          {count} x {error}");
        }
        if duplicates > 0 {
            println!("          {duplicates} deliveries of a post a subscriber already had");
        }
    }
    summarize(&results, &modes, &args.in_flight, args.rounds);
    let resumed = deliveries.resumed.load(Ordering::Relaxed);
    if resumed > 0 {
        println!("          {resumed} subscription streams broke and were resumed");
    }
    for follower in followers {
        follower.abort();
    }
    drop(posters);
    cluster.stop().await;
    Ok(())
}

/// One run's figures, for the summary.
#[derive(Debug, Clone, Copy)]
struct RunResult {
    /// Index into the attachments compared.
    mode: usize,
    in_flight: usize,
    posts_per_s: f64,
    ack_p50_ms: f64,
    delivery_p50_ms: f64,
    node_cpu_us: Option<f64>,
}

fn attach_name(attach: Attach) -> &'static str {
    match attach {
        Attach::Any => "any",
        Attach::Replica => "replica",
        Attach::NonReplica => "non-replica",
        Attach::Compare => "compare",
    }
}

/// Medians per attachment and in-flight value over the rounds; with two attachments, what the
/// second costs against the first, per round and as the median of those rounds.
fn summarize(results: &[RunResult], modes: &[Attach], in_flights: &[usize], rounds: usize) {
    if rounds <= 1 && modes.len() <= 1 {
        return;
    }
    for &in_flight in in_flights {
        let of = |mode: usize| -> Vec<RunResult> {
            results.iter().copied().filter(|r| r.mode == mode && r.in_flight == in_flight).collect()
        };
        for (mode, attach) in modes.iter().enumerate() {
            let runs = of(mode);
            let posts = median(runs.iter().map(|r| r.posts_per_s).collect()).unwrap_or(0.0);
            let ack = median(runs.iter().map(|r| r.ack_p50_ms).collect()).unwrap_or(0.0);
            let delivery = median(runs.iter().map(|r| r.delivery_p50_ms).collect()).unwrap_or(0.0);
            let cpu = median(runs.iter().filter_map(|r| r.node_cpu_us).collect())
                .map_or_else(|| "-".to_owned(), |cpu| format!("{cpu:.0}"));
            println!(
                "median of {} (attach {}, {in_flight} in flight): {posts:.0} posts/s, ack p50 {ack:.2} ms, \
                 delivery p50 {delivery:.2} ms, node cpu {cpu} µs/post",
                runs.len(),
                attach_name(*attach),
            );
        }
        if modes.len() == 2 {
            let pairs: Vec<(RunResult, RunResult)> = of(0).into_iter().zip(of(1)).collect();
            let hop = HopCost::of(&pairs);
            let rounds: Vec<String> = hop.throughput_pct.iter().map(|c| format!("{c:.0}%")).collect();
            let cpu = median(hop.node_cpu_pct.clone()).map_or_else(|| "-".to_owned(), |c| format!("{c:+.1}%"));
            println!(
                "the hop ({in_flight} in flight): median {:.1}% of throughput (rounds: {}), node cpu per post {cpu}, \
                 ack p50 +{:.2} ms",
                median(hop.throughput_pct.clone()).unwrap_or(0.0),
                rounds.join(", "),
                median(hop.ack_p50_ms).unwrap_or(0.0),
            );
        }
    }
}

/// What the second attachment cost against the first, round by round.
#[derive(Debug, Default, PartialEq)]
struct HopCost {
    /// Throughput lost, in percent of the first attachment's.
    throughput_pct: Vec<f64>,
    /// Node CPU per post added, in percent (rounds where both runs measured it). Steadier than
    /// throughput on a shared host: another tenant's load slows both the same way.
    node_cpu_pct: Vec<f64>,
    /// Ack p50 added, in ms.
    ack_p50_ms: Vec<f64>,
}

impl HopCost {
    fn of(pairs: &[(RunResult, RunResult)]) -> Self {
        let mut cost = Self::default();
        for (near, far) in pairs {
            cost.throughput_pct.push(100.0 * (1.0 - far.posts_per_s / near.posts_per_s.max(1.0)));
            if let (Some(n), Some(f)) = (near.node_cpu_us, far.node_cpu_us)
                && n > 0.0
            {
                cost.node_cpu_pct.push(100.0 * (f / n - 1.0));
            }
            cost.ack_p50_ms.push(far.ack_p50_ms - near.ack_p50_ms);
        }
        cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_carries_its_run_time_and_key() {
        let text = body(3, 123_456, 7, 9, 200);
        assert_eq!(text.len(), 200);
        assert_eq!(parse_body(&text), Some((3, 123_456, key(7, 9))));
        assert_eq!(parse_body("hello"), None);
        assert_eq!(parse_body("bench x"), None);
    }

    #[test]
    fn the_hop_is_costed_round_by_round_in_throughput_cpu_and_latency() {
        let run = |mode, posts_per_s, ack_p50_ms, node_cpu_us| RunResult {
            mode,
            in_flight: 64,
            posts_per_s,
            ack_p50_ms,
            delivery_p50_ms: 1.0,
            node_cpu_us,
        };
        let pairs = [
            (run(0, 5_000.0, 10.0, Some(400.0)), run(1, 4_000.0, 12.5, Some(500.0))),
            (run(0, 4_000.0, 11.0, None), run(1, 4_400.0, 10.0, Some(380.0))),
        ];
        let hop = HopCost::of(&pairs);
        let rounded = |values: &[f64]| values.iter().map(|v| (v * 1e6).round() / 1e6).collect::<Vec<_>>();
        assert_eq!(rounded(&hop.throughput_pct), vec![20.0, -10.0]);
        assert_eq!(rounded(&hop.node_cpu_pct), vec![25.0], "a round without both CPU figures is left out");
        assert_eq!(rounded(&hop.ack_p50_ms), vec![2.5, -1.0]);
    }
}
