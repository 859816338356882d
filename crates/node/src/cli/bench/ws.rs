//! `palaver bench ws`: the WebSocket gateway (`docs/websocket.md`) under many clients.
//!
//! Every client is a WebSocket connection of its own, authenticated with a token (`authenticate`
//! frame) and subscribed to one room; connections are spread evenly over the nodes. The bench
//! measures, in order:
//!
//! 1. **Idle connections.** `--connections` connections open and authenticate, then subscribe.
//!    The memory they cost is the growth of the node processes' resident set (`VmRSS`) divided
//!    by the connections, read after they authenticated and again after they subscribed (only
//!    when the bench started the nodes: with `--addr` it does not know their processes). The
//!    nodes are restarted between the setup and this phase: the setup's logins hash passwords
//!    (argon2, 19 MiB each), and the allocator keeps much of that memory, which connections
//!    would then reuse unseen. After the restart the bench opens one warm-up connection per
//!    room and node (subscribed; they stay open), so that loading the rooms is not counted as
//!    the connections' cost, and waits until the nodes' resident sets stop growing (a node
//!    just started grows by about a third of its size while it loads its shards).
//! 2. **Delivery latency with them open.** A light load (`--idle-rate` posts/s, one posting
//!    connection per room or more) for `--seconds`: posts/s, ack latency, and latency from a
//!    post's sending to its event at every subscriber of its room.
//! 3. **Chat shape.** The idle connections close; `--rooms` × `--subscribers-per-room` users
//!    each open one connection, subscribe to their room and post into it, as fast as
//!    acknowledgements and the per-user write limit allow (or `--rate` posts/s in total), for
//!    `--seconds`.
//!
//! Users: the chat shape's, each a member of one room; in the idle phase they hold
//! `--connections / users` connections each (10 by default), subscribed to their own room.
//! Logging them in costs two argon2 hashes each, most of the setup time.
//!
//! Each posting connection has one post in flight, sends its next no sooner than
//! [`USER_POST_INTERVAL_MS`] after the last (the node allows a user 20 writes/s), honours
//! `rate_limited` by waiting `retry_after_ms` and retries other retryable refusals with the same
//! `client_message_id`. A body carries its run, send time, connection and sequence number, so
//! every delivery is timed and checked off: after a run the bench waits (up to
//! [`DRAIN_DEADLINE_MS`]) until every subscriber holds every acknowledged post of its room;
//! what is still absent is `missing`, what arrived twice is `dup`. A connection that breaks
//! reconnects and resubscribes from its version vector, as a client should; a subscription
//! that ends is resumed the same way; both are counted.
//!
//! Each connection is one task that owns its socket and parses only the fields it needs from
//! the frames it reads: the bench shares two cores with the nodes it measures.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::posts::{DRAIN_DEADLINE_MS, USER_POST_INTERVAL_MS, body, key, parse_body};
use super::{Cluster, ClusterArgs, quantile_ms};

/// The nodes' resident sets count as settled when they changed by less than this...
const RSS_SETTLED_KIB: u64 = 2 * 1024;
/// ...over this long.
const RSS_SETTLE_WINDOW_MS: u64 = 2_000;
/// Longest wait for the nodes to settle.
const RSS_SETTLE_MAX_MS: u64 = 60_000;

/// In the idle phase, each posting connection posts at most this many posts/s (more posters
/// are used for higher `--idle-rate`).
pub const IDLE_POSTS_PER_SECOND_PER_POSTER_MAX: u64 = 10;
/// How long the bench waits for all connections to open, and then to subscribe.
pub const OPEN_DEADLINE_MS: u64 = 120_000;
/// How long closing connections may take before their tasks are aborted.
pub const CLOSE_DEADLINE_MS: u64 = 10_000;
/// Connections being opened (TCP, upgrade, `authenticate`) at once.
pub const OPEN_IN_FLIGHT_MAX: usize = 256;
/// Attempts to open a connection before it counts as failed.
pub const OPEN_ATTEMPTS_MAX: u32 = 3;
/// Wait before reopening a broken connection, and before retrying a refused post that may be
/// retried (other than `rate_limited`, which says how long).
pub const RETRY_DELAY_MS: u64 = 100;
/// Setup connections (register, login, join) per node.
pub const SETUP_CONNECTIONS_PER_NODE: usize = 4;
/// Most bytes a connection reads from its socket at once (frames may be bigger; the buffer
/// grows for them). Small, so that idle connections cost the bench little.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;
/// The per-address WebSocket connection limit of the nodes the bench starts (all its
/// connections come from 127.0.0.1).
pub const NODE_CONNECTIONS_PER_ADDRESS: usize = 20_000;
/// Posting starts this long after the plan is sent, so that every connection has seen it.
pub const RUN_START_DELAY_MS: u64 = 100;
/// File descriptors the bench needs beyond one per connection (setup, the runtime, stdio).
pub const FILE_DESCRIPTORS_SPARE: u64 = 256;
/// How often the bench checks a condition it waits for.
pub const POLL_INTERVAL_MS: u64 = 20;

#[derive(Debug, Args)]
pub struct WsBenchArgs {
    #[command(flatten)]
    cluster: ClusterArgs,
    /// HTTP address of a node of the cluster named by `--addr` (repeat for each node).
    #[arg(long)]
    http_addr: Vec<String>,
    /// Idle connections to open (phases 1 and 2); 0 skips them.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Rooms (spread over the shards).
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Subscribers per room in the chat shape, each a user with one connection; users are
    /// rooms × subscribers-per-room.
    #[arg(long, default_value_t = 10)]
    subscribers_per_room: usize,
    /// Seconds of each posting run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Chat shape: post at this many posts/s in total instead of as fast as the connections
    /// can.
    #[arg(long)]
    rate: Option<u64>,
    /// Posts/s while the idle connections are open.
    #[arg(long, default_value_t = 100)]
    idle_rate: u64,
    /// Bytes per message body.
    #[arg(long, default_value_t = 200)]
    body_bytes: usize,
    /// First gRPC port of the cluster the bench starts.
    #[arg(long, default_value_t = 7501)]
    base_port: u16,
    /// First HTTP (WebSocket) port of the cluster the bench starts.
    #[arg(long, default_value_t = 8501)]
    http_base_port: u16,
}

pub async fn run(args: WsBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rooms > 0 && args.subscribers_per_room > 0,
        "--rooms and --subscribers-per-room must be positive"
    );
    let users = args.rooms * args.subscribers_per_room;
    let file_limit = rlimit::increase_nofile_limit(u64::MAX).context("raise the open-file limit")?;
    let needed = (args.connections.max(users) as u64).saturating_add(FILE_DESCRIPTORS_SPARE);
    if file_limit < needed {
        println!("note: {file_limit} open files allowed (hard limit), about {needed} needed");
    }
    let (mut cluster, urls) = if args.cluster.addr.is_empty() {
        let extra = vec!["--ws-connections-per-address".to_string(), NODE_CONNECTIONS_PER_ADDRESS.to_string()];
        let cluster = Cluster::open_with(&args.cluster, args.base_port, Some(args.http_base_port), extra).await?;
        let urls: Vec<String> =
            cluster.processes.iter().filter_map(|p| p.http.as_ref()).map(|http| format!("ws://{http}/ws")).collect();
        (cluster, urls)
    } else {
        anyhow::ensure!(!args.http_addr.is_empty(), "with --addr, name every node's HTTP address with --http-addr");
        println!(
            "note: nodes refuse more than --ws-connections-per-address connections from one address (default {})",
            palaver_node::http::CONNECTIONS_PER_ADDRESS_DEFAULT
        );
        let urls = args.http_addr.iter().map(|http| format!("ws://{http}/ws")).collect();
        (Cluster::open(&args.cluster, args.base_port).await?, urls)
    };
    let nodes = urls.len();

    let run_id = std::process::id();
    let rooms: Vec<String> = (0..args.rooms).map(|r| format!("ws-{run_id}-{r}")).collect();
    let names: Vec<String> = (0..users).map(|u| format!("bw-{run_id}-{u}")).collect();
    println!("setup: {} rooms, {users} users (each a member of one room), {nodes} nodes", rooms.len());
    let setup_started = Instant::now();
    let rss_start = nodes_rss_kib(&node_pids(&cluster));
    let tokens = setup(&urls, &rooms, &names).await?;
    println!("setup: done in {:.1} s", setup_started.elapsed().as_secs_f64());
    if let (Some(start), Some(after)) = (rss_start, nodes_rss_kib(&node_pids(&cluster))) {
        // Each login hashes a password (argon2, 19 MiB); the allocator keeps much of that memory,
        // which new connections would reuse unseen.
        println!(
            "setup: nodes' RSS grew from {} to {} MiB; restarting them, so that it does not hide the connections' cost",
            start / 1024,
            after / 1024
        );
        cluster.restart().await?;
    }
    let pids = node_pids(&cluster);
    let shared = Arc::new(Shared { urls, tokens, rooms, epoch: Instant::now(), body_bytes: args.body_bytes });
    let mut table = Table::default();
    if args.connections > 0 {
        idle(&args, &shared, &pids, &mut table).await?;
    }
    chat(&args, &shared, &mut table).await?;
    cluster.stop().await;
    Ok(())
}

/// Phases 1 and 2: open the idle connections and measure what they cost, then post lightly
/// while they are open.
async fn idle(args: &WsBenchArgs, shared: &Arc<Shared>, pids: &[u32], table: &mut Table) -> anyhow::Result<()> {
    let (users, nodes) = (shared.tokens.len(), shared.urls.len());
    let peers: Vec<Peer> = (0..args.connections)
        .map(|i| {
            let user = i % users;
            Peer::new(i, user, user % args.rooms, i % nodes)
        })
        .collect::<Result<_, _>>()?;
    // One connection per room and node, subscribed, kept open: the rooms are loaded on every
    // node before the measured connections open.
    let warm_peers: Vec<Peer> = (0..args.rooms * nodes)
        .map(|i| Peer::new(i, i % args.rooms, i % args.rooms, i / args.rooms))
        .collect::<Result<_, _>>()?;
    let warm = Group::start(shared.clone(), warm_peers);
    warm.wait_opened().await?;
    warm.subscribe().await?;
    let settle = settle_rss(pids).await;
    let rss_before = nodes_rss_kib(pids);
    let bench_rss_before = rss_kib("self");
    let opening = Instant::now();
    let group = Group::start(shared.clone(), peers);
    let opened = group.wait_opened().await?;
    let authenticated_s = opening.elapsed().as_secs_f64();
    let rss_authenticated = nodes_rss_kib(pids);
    group.subscribe().await?;
    let subscribed_s = opening.elapsed().as_secs_f64() - authenticated_s;
    let rss_subscribed = nodes_rss_kib(pids);
    println!(
        "idle: {opened} connections ({}) open and authenticated in {authenticated_s:.1} s, subscribed in \
         {subscribed_s:.1} s ({:.0} connections/s), on top of {} warm-up connections (the nodes settled in {:.1} s)",
        group.opened_per_node(nodes).iter().map(usize::to_string).collect::<Vec<_>>().join(" + "),
        opened as f64 / (authenticated_s + subscribed_s).max(f64::EPSILON),
        warm.peers.len(),
        settle.as_secs_f64(),
    );
    group.print_trouble();
    match (rss_before, rss_authenticated, rss_subscribed) {
        (Some(before), Some(authenticated), Some(subscribed)) if opened > 0 => {
            let per = |kib: u64| kib as f64 / opened as f64;
            println!(
                "idle: nodes' RSS {:.0} MiB -> {:.0} MiB: {:.1} KiB per connection ({:.1} KiB once authenticated, \
                 +{:.1} KiB for its subscription)",
                before as f64 / 1024.0,
                subscribed as f64 / 1024.0,
                per(subscribed.saturating_sub(before)),
                per(authenticated.saturating_sub(before)),
                per(subscribed.saturating_sub(authenticated)),
            );
        }
        _ => println!("idle: memory per connection not measured (the bench did not start the nodes)"),
    }
    if let (Some(before), Some(after)) = (bench_rss_before, rss_kib("self")) {
        let per_connection = after.saturating_sub(before) as f64 / opened.max(1) as f64;
        println!("idle: the bench itself: {per_connection:.1} KiB per connection");
    }
    if args.idle_rate > 0 {
        let posters = (args.rooms as u64).max(args.idle_rate.div_ceil(IDLE_POSTS_PER_SECOND_PER_POSTER_MAX));
        let posters = usize::try_from(posters)?.min(args.connections);
        let interval = Duration::from_secs_f64(posters as f64 / args.idle_rate as f64);
        let label = format!("idle {opened}, {}/s", args.idle_rate);
        group.run(table, label, posters, Some(interval), args.seconds).await?;
    }
    group.close().await;
    warm.close().await;
    Ok(())
}

/// Wait until the nodes' resident sets stop growing (less than [`RSS_SETTLED_KIB`] in
/// [`RSS_SETTLE_WINDOW_MS`]), at most [`RSS_SETTLE_MAX_MS`]; how long that took.
async fn settle_rss(pids: &[u32]) -> Duration {
    let started = Instant::now();
    let mut last = nodes_rss_kib(pids);
    while started.elapsed() < Duration::from_millis(RSS_SETTLE_MAX_MS) {
        tokio::time::sleep(Duration::from_millis(RSS_SETTLE_WINDOW_MS)).await;
        let now = nodes_rss_kib(pids);
        match (last, now) {
            (Some(last), Some(now)) if now.abs_diff(last) < RSS_SETTLED_KIB => break,
            (None, _) | (_, None) => break,
            _ => last = now,
        }
    }
    started.elapsed()
}

/// Phase 3: a connection per user, each subscribed to its room and posting into it.
async fn chat(args: &WsBenchArgs, shared: &Arc<Shared>, table: &mut Table) -> anyhow::Result<()> {
    let (users, nodes) = (shared.tokens.len(), shared.urls.len());
    let peers: Vec<Peer> = (0..users).map(|u| Peer::new(u, u, u % args.rooms, u % nodes)).collect::<Result<_, _>>()?;
    let group = Group::start(shared.clone(), peers);
    let opened = group.wait_opened().await?;
    group.subscribe().await?;
    println!(
        "chat: {opened} connections, {} rooms of {} subscribers, all posting",
        args.rooms, args.subscribers_per_room
    );
    group.print_trouble();
    let interval = args.rate.map(|rate| Duration::from_secs_f64(users as f64 / rate.max(1) as f64));
    let pace = args.rate.map_or_else(|| "full".to_string(), |rate| format!("{rate}/s"));
    let label = format!("chat {}x{}, {pace}", args.rooms, args.subscribers_per_room);
    group.run(table, label, users, interval, args.seconds).await?;
    group.close().await;
    Ok(())
}

/// Register the users (if new), log each in (its token), and make each a member of its room
/// (user `u` of room `u % rooms`); create the rooms first.
async fn setup(urls: &[String], rooms: &[String], users: &[String]) -> anyhow::Result<Vec<String>> {
    let url = urls.first().context("no node to connect to")?;
    let mut owner = Client::open(url).await?;
    owner.sign_in("bench-owner").await?;
    for room in rooms {
        owner.call("create_room", json!({ "room": room })).await?.map_err(|e| anyhow::anyhow!("create {room}: {e}"))?;
    }
    owner.close().await;
    let workers = SETUP_CONNECTIONS_PER_NODE * urls.len();
    let mut tasks = Vec::new();
    for worker in 0..workers {
        let url = urls[worker % urls.len()].clone();
        let mine: Vec<(usize, String, String)> = users
            .iter()
            .enumerate()
            .skip(worker)
            .step_by(workers)
            .map(|(u, name)| (u, name.clone(), rooms[u % rooms.len()].clone()))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::open(&url).await?;
            let mut tokens = Vec::with_capacity(mine.len());
            for (u, name, room) in mine {
                let token = client.sign_in(&name).await?;
                match client.call("join", json!({ "room": room })).await? {
                    Ok(_) => {}
                    Err(e) if e.code == "already_member" => {}
                    Err(e) => anyhow::bail!("{name} joins {room}: {e}"),
                }
                tokens.push((u, token));
            }
            client.close().await;
            anyhow::Ok(tokens)
        }));
    }
    let mut tokens = vec![String::new(); users.len()];
    for task in tasks {
        for (u, token) in task.await?? {
            tokens[u] = token;
        }
    }
    Ok(tokens)
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> Result<Socket, String> {
    let config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES);
    let (socket, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))?;
    Ok(socket)
}

async fn send(socket: &mut Socket, frame: &Value) -> Result<(), String> {
    socket.send(Message::text(frame.to_string())).await.map_err(|e| format!("send: {e}"))
}

/// The next text frame; `Err` when the connection ends.
async fn next_text(socket: &mut Socket) -> Result<Utf8Bytes, String> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(text),
            Some(Ok(Message::Close(_))) | None => return Err("closed by the node".into()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("read: {e}")),
        }
    }
}

/// A refusal, as an `error` frame carries it.
#[derive(Debug, Deserialize)]
struct Refusal {
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

/// A setup connection: one operation at a time, answered in order.
struct Client {
    socket: Socket,
    next_id: u64,
}

impl Client {
    async fn open(url: &str) -> anyhow::Result<Self> {
        Ok(Self { socket: connect(url).await.map_err(anyhow::Error::msg)?, next_id: 0 })
    }

    /// Run `op`: its result, or the node's refusal (after waiting out `rate_limited`).
    async fn call(&mut self, op: &str, args: Value) -> anyhow::Result<Result<Value, Refusal>> {
        loop {
            self.next_id += 1;
            let id = self.next_id;
            send(&mut self.socket, &json!({ "id": id, "op": op, "args": args })).await.map_err(anyhow::Error::msg)?;
            let mut frame = loop {
                let text = next_text(&mut self.socket).await.map_err(anyhow::Error::msg)?;
                let frame: Value = serde_json::from_str(text.as_str()).context("a frame that is not JSON")?;
                if frame.get("id").and_then(Value::as_u64) == Some(id) {
                    break frame;
                }
            };
            if frame.get("type").and_then(Value::as_str) == Some("reply") {
                return Ok(Ok(frame.get_mut("result").map(Value::take).unwrap_or_default()));
            }
            let refusal: Refusal = serde_json::from_value(frame.get_mut("error").map(Value::take).unwrap_or_default())
                .with_context(|| format!("{op}: an error frame without an error"))?;
            match refusal.retry_after_ms {
                Some(wait_ms) if refusal.code == "rate_limited" => {
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                }
                _ => return Ok(Err(refusal)),
            }
        }
    }

    /// Register `user` (if new) and log in as it: its token.
    async fn sign_in(&mut self, user: &str) -> anyhow::Result<String> {
        let credentials = json!({ "user": user, "password": "bench-password" });
        match self.call("register", credentials.clone()).await? {
            Ok(_) => {}
            Err(e) if e.code == "user_exists" => {}
            Err(e) => anyhow::bail!("register {user}: {e}"),
        }
        let login = self.call("login", credentials).await?.map_err(|e| anyhow::anyhow!("login {user}: {e}"))?;
        login.get("token").and_then(Value::as_str).map(str::to_owned).context("a login reply without a token")
    }

    async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

/// What every connection of the bench shares.
#[derive(Debug)]
struct Shared {
    /// Each node's WebSocket URL.
    urls: Vec<String>,
    /// Each user's token.
    tokens: Vec<String>,
    rooms: Vec<String>,
    /// Send and receive times are measured from here.
    epoch: Instant,
    body_bytes: usize,
}

impl Shared {
    fn since_epoch_us(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

/// Where a connection goes and what it does there.
#[derive(Debug, Clone, Copy)]
struct Peer {
    /// Its place in its group (the first `posters` of a run post).
    index: u32,
    /// Its user (index into the tokens).
    user: u32,
    /// The room it subscribes and posts to (index into the rooms).
    room: u32,
    /// The node it connects to (index into the URLs).
    node: u32,
}

impl Peer {
    fn new(index: usize, user: usize, room: usize, node: usize) -> anyhow::Result<Self> {
        Ok(Self {
            index: u32::try_from(index)?,
            user: u32::try_from(user)?,
            room: u32::try_from(room)?,
            node: u32::try_from(node)?,
        })
    }
}

/// What a group's connections do now; the bench moves them through these in order.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Open and authenticate, then wait.
    Open,
    /// Subscribe to your room and read.
    Subscribe,
    /// Subscribed; the posters post in this run.
    Post(Run),
    /// Close the connection (a WebSocket close handshake).
    Close,
}

/// One posting run.
#[derive(Debug, Clone, Copy)]
struct Run {
    run: u32,
    /// Connections `0..posters` post.
    posters: u32,
    /// Each poster's time between posts; `None`: as fast as it can.
    interval: Option<Duration>,
    start: Instant,
    stop: Instant,
}

/// One delivery of a bench post: its run, key, and latency from its sending.
#[derive(Debug, Clone, Copy)]
struct Delivery {
    run: u32,
    key: u64,
    latency_us: u32,
}

/// What one connection recorded, for the bench to count after a run.
#[derive(Debug, Default)]
struct Slot {
    /// Authenticated at least once.
    opened: bool,
    /// Bench posts received on its subscription.
    received: Vec<Delivery>,
    /// Its own posts acknowledged, with their ack latency.
    acked: Vec<Delivery>,
}

/// A group of connections: their records and counters, shared with their tasks.
#[derive(Debug, Default)]
struct Records {
    slots: Vec<Mutex<Slot>>,
    /// Connections authenticated once.
    opened: AtomicUsize,
    /// Connections that could not be opened.
    failed: AtomicUsize,
    /// Subscriptions caught up once.
    caught_up: AtomicUsize,
    /// The run being counted, and its deliveries so far (duplicates included).
    run: AtomicU32,
    delivered: AtomicU64,
    /// Posts sent and not yet acknowledged or given up.
    posts_in_flight: AtomicU64,
    /// `rate_limited` answers to posts.
    rate_limited: AtomicU64,
    /// Connections reopened after they broke, subscriptions resumed after they ended.
    reconnects: AtomicU64,
    resubscribes: AtomicU64,
    /// Other refusals and failures, by kind.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Why the first connection that failed to open did.
    first_failure: Mutex<Option<String>>,
}

impl Records {
    fn slot(&self, peer: Peer) -> std::sync::MutexGuard<'_, Slot> {
        let slot = &self.slots[peer.index as usize];
        slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_error(&self, kind: String) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()).entry(kind).or_default() += 1;
    }

    fn take_errors(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *self.errors.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// A post sent and not yet acknowledged.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The frame that carries it (a retry gets a new one).
    id: u64,
    run: u32,
    seq: u32,
    sent: Instant,
    /// When to send it again, after a refusal or a broken connection.
    retry_at: Option<Instant>,
}

/// One connection's state across reconnections.
#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// For each replica, the highest counter received (where a resumed subscription starts).
    version_vector: BTreeMap<u64, u64>,
    caught_up: bool,
    run: Option<Run>,
    seq: u32,
    pending: Option<Pending>,
    /// When the next post of the run is due; `None`: no more.
    next_post_at: Option<Instant>,
}

impl State {
    fn start_run(&mut self, peer: Peer, run: Run) {
        self.run = Some(run);
        self.next_post_at = (peer.index < run.posters).then(|| {
            let offset =
                run.interval.map_or(Duration::ZERO, |i| i.mul_f64(f64::from(peer.index) / f64::from(run.posters)));
            run.start + offset
        });
    }

    /// When this connection has a post to send.
    fn post_due(&self) -> Option<Instant> {
        match &self.pending {
            Some(pending) => pending.retry_at,
            None => self.next_post_at,
        }
    }
}

/// A frame from the node: only the fields the bench reads.
#[derive(Debug, Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    sub: Option<u64>,
    #[serde(default, borrow)]
    event: Option<Event<'a>>,
    #[serde(default, borrow)]
    error: Option<ErrorInfo<'a>>,
}

#[derive(Debug, Deserialize)]
struct Event<'a> {
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    change: Option<Cow<'a, str>>,
    #[serde(default)]
    position: Option<Position>,
    #[serde(default, borrow)]
    message: Option<EventMessage<'a>>,
}

#[derive(Debug, Deserialize)]
struct Position {
    replica: u64,
    counter: u64,
}

#[derive(Debug, Deserialize)]
struct EventMessage<'a> {
    #[serde(borrow)]
    body: Cow<'a, str>,
}

#[derive(Debug, Deserialize)]
struct ErrorInfo<'a> {
    #[serde(borrow)]
    code: Cow<'a, str>,
    #[serde(default)]
    retryable: bool,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// What a frame asks of its connection.
enum Next {
    Read,
    /// The subscription ended and may be resumed.
    Resubscribe,
    /// The connection cannot go on.
    Fail(String),
}

/// One connection, for its task.
struct Connection {
    shared: Arc<Shared>,
    records: Arc<Records>,
    peer: Peer,
    plan: watch::Receiver<Plan>,
    state: State,
}

impl Connection {
    /// Open, serve the plan, reopen if the connection breaks; until the plan says close.
    async fn run(mut self, opening: Arc<Semaphore>) {
        let mut attempts = 0u32;
        loop {
            if matches!(*self.plan.borrow(), Plan::Close) {
                return;
            }
            let opened = self.records.slot(self.peer).opened;
            let permit = if opened { None } else { opening.clone().acquire_owned().await.ok() };
            let result = match self.open().await {
                Ok(mut socket) => {
                    drop(permit);
                    self.serve(&mut socket).await
                }
                Err(e) => Err(e),
            };
            let Err(error) = result else { return };
            if self.records.slot(self.peer).opened {
                self.records.reconnects.fetch_add(1, Ordering::Relaxed);
                self.records.count_error(format!("connection broke: {error}"));
            } else {
                attempts += 1;
                if attempts >= OPEN_ATTEMPTS_MAX {
                    self.records.failed.fetch_add(1, Ordering::Relaxed);
                    self.records.first_failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(error);
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(RETRY_DELAY_MS)).await;
        }
    }

    /// Connect and authenticate.
    async fn open(&mut self) -> Result<Socket, String> {
        let mut socket = connect(&self.shared.urls[self.peer.node as usize]).await?;
        self.state.next_id += 1;
        let id = self.state.next_id;
        let token = &self.shared.tokens[self.peer.user as usize];
        send(&mut socket, &json!({ "id": id, "op": "authenticate", "args": { "token": token } })).await?;
        loop {
            let text = next_text(&mut socket).await?;
            let Ok(frame) = serde_json::from_str::<Incoming>(text.as_str()) else { continue };
            if frame.id != Some(id) {
                continue;
            }
            if let Some(error) = frame.error {
                return Err(format!("authenticate: {}", error.code));
            }
            break;
        }
        let mut slot = self.records.slot(self.peer);
        if !slot.opened {
            slot.opened = true;
            self.records.opened.fetch_add(1, Ordering::Relaxed);
        }
        Ok(socket)
    }

    /// Subscribe when the plan says so, then read events and post until the plan says close
    /// (`Ok`) or the connection breaks.
    async fn serve(&mut self, socket: &mut Socket) -> Result<(), String> {
        loop {
            // Copied out: the plan must not stay borrowed across an await.
            let plan = *self.plan.borrow_and_update();
            match plan {
                Plan::Open => {}
                Plan::Close => {
                    close(socket).await;
                    return Ok(());
                }
                Plan::Subscribe => break,
                Plan::Post(run) => {
                    if self.state.run.is_none_or(|current| current.run != run.run) {
                        self.state.start_run(self.peer, run);
                    }
                    break;
                }
            }
            if self.plan.changed().await.is_err() {
                return Ok(());
            }
        }
        let mut sub = self.subscribe(socket).await?;
        // A post whose answer the broken connection lost goes again (same client_message_id).
        if let Some(pending) = &mut self.state.pending {
            pending.retry_at = Some(pending.retry_at.unwrap_or_else(Instant::now));
        }
        loop {
            let post_due = self.state.post_due();
            tokio::select! {
                message = socket.next() => {
                    let text = match message {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Close(_))) | None => return Err("closed by the node".into()),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(format!("read: {e}")),
                    };
                    match self.on_frame(text.as_str(), sub) {
                        Next::Read => {}
                        Next::Resubscribe => sub = self.subscribe(socket).await?,
                        Next::Fail(error) => return Err(error),
                    }
                }
                changed = self.plan.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let plan = *self.plan.borrow_and_update();
                    match plan {
                        Plan::Close => {
                            close(socket).await;
                            return Ok(());
                        }
                        Plan::Post(run) => self.state.start_run(self.peer, run),
                        Plan::Open | Plan::Subscribe => {}
                    }
                }
                () = sleep_until(post_due) => self.post(socket).await?,
            }
        }
    }

    /// Subscribe to the room from the version vector held: the subscription's id.
    async fn subscribe(&mut self, socket: &mut Socket) -> Result<u64, String> {
        self.state.next_id += 1;
        let id = self.state.next_id;
        let mut args = json!({ "room": self.shared.rooms[self.peer.room as usize] });
        if !self.state.version_vector.is_empty() {
            let vector: BTreeMap<String, u64> =
                self.state.version_vector.iter().map(|(replica, counter)| (replica.to_string(), *counter)).collect();
            args["version_vector"] = json!(vector);
        }
        send(socket, &json!({ "id": id, "op": "subscribe", "args": args })).await?;
        Ok(id)
    }

    /// Send the pending post again, or the next one of the run.
    async fn post(&mut self, socket: &mut Socket) -> Result<(), String> {
        let now = Instant::now();
        let mut pending = match self.state.pending.take() {
            Some(pending) => pending,
            None => {
                let Some(run) = self.state.run else {
                    self.state.next_post_at = None;
                    return Ok(());
                };
                self.state.seq += 1;
                let due = self.state.next_post_at.unwrap_or(now);
                let next = match run.interval {
                    Some(interval) => due + interval,
                    None => now + Duration::from_millis(USER_POST_INTERVAL_MS),
                };
                self.state.next_post_at = Some(next).filter(|next| *next < run.stop);
                self.records.posts_in_flight.fetch_add(1, Ordering::Relaxed);
                Pending { id: 0, run: run.run, seq: self.state.seq, sent: now, retry_at: None }
            }
        };
        self.state.next_id += 1;
        pending.id = self.state.next_id;
        pending.retry_at = None;
        self.state.pending = Some(pending);
        let sent_us = self.shared.since_epoch_us(pending.sent);
        let text = body(pending.run, sent_us, self.peer.index, pending.seq, self.shared.body_bytes);
        let frame = json!({ "id": pending.id, "op": "post", "args": {
            "room": self.shared.rooms[self.peer.room as usize],
            "body": text,
            "client_message_id": format!("{}-{}-{}", pending.run, self.peer.index, pending.seq),
        } });
        send(socket, &frame).await
    }

    fn on_frame(&mut self, text: &str, sub: u64) -> Next {
        let Ok(frame) = serde_json::from_str::<Incoming>(text) else {
            self.records.count_error("a frame the bench could not read".into());
            return Next::Read;
        };
        let pending = self.state.pending.filter(|pending| frame.id == Some(pending.id));
        match frame.kind.as_ref() {
            "event" if frame.sub == Some(sub) => {
                if let Some(event) = frame.event {
                    self.on_event(event);
                }
            }
            "reply" => {
                if let Some(pending) = pending {
                    self.state.pending = None;
                    self.records.posts_in_flight.fetch_sub(1, Ordering::Relaxed);
                    let key = key(self.peer.index, pending.seq);
                    let latency_us = u32::try_from(pending.sent.elapsed().as_micros()).unwrap_or(u32::MAX);
                    self.records.slot(self.peer).acked.push(Delivery { run: pending.run, key, latency_us });
                }
            }
            "error" => {
                let (code, retryable, retry_after_ms) = frame
                    .error
                    .map_or((Cow::Borrowed("unknown"), false, None), |e| (e.code, e.retryable, e.retry_after_ms));
                if let Some(mut pending) = pending {
                    if code == "rate_limited" {
                        self.records.rate_limited.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.records.count_error(format!("post: {code}"));
                    }
                    if retryable {
                        let wait_ms = retry_after_ms.unwrap_or(RETRY_DELAY_MS);
                        pending.retry_at = Some(Instant::now() + Duration::from_millis(wait_ms));
                        self.state.pending = Some(pending);
                    } else {
                        self.state.pending = None;
                        self.records.posts_in_flight.fetch_sub(1, Ordering::Relaxed);
                    }
                } else if frame.id == Some(sub) {
                    return Next::Fail(format!("subscribe: {code}"));
                } else {
                    self.records.count_error(format!("error: {code}"));
                }
            }
            "ended" if frame.sub == Some(sub) => {
                let (code, retryable) =
                    frame.error.map_or((Cow::Borrowed("unknown"), false), |e| (e.code, e.retryable));
                self.records.count_error(format!("subscription ended: {code}"));
                if !retryable {
                    return Next::Fail(format!("subscription ended: {code}"));
                }
                self.records.resubscribes.fetch_add(1, Ordering::Relaxed);
                return Next::Resubscribe;
            }
            "closing" => {
                let code = frame.error.map_or(Cow::Borrowed("unknown"), |e| e.code);
                self.records.count_error(format!("closing: {code}"));
            }
            _ => {}
        }
        Next::Read
    }

    fn on_event(&mut self, event: Event<'_>) {
        match event.kind.as_ref() {
            "message" => {
                if let Some(position) = event.position {
                    let counter = self.state.version_vector.entry(position.replica).or_default();
                    *counter = (*counter).max(position.counter);
                }
                if event.change.as_deref() != Some("posted") {
                    return;
                }
                let Some((run, sent_us, key)) = event.message.as_ref().and_then(|m| parse_body(&m.body)) else {
                    return;
                };
                let now_us = self.shared.since_epoch_us(Instant::now());
                let latency_us = u32::try_from(now_us.saturating_sub(sent_us)).unwrap_or(u32::MAX);
                self.records.slot(self.peer).received.push(Delivery { run, key, latency_us });
                if run == self.records.run.load(Ordering::Relaxed) {
                    self.records.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
            "caught_up" if !self.state.caught_up => {
                self.state.caught_up = true;
                self.records.caught_up.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Close the connection and wait for the node's close frame.
async fn close(socket: &mut Socket) {
    let _ = socket.close(None).await;
    let _ = tokio::time::timeout(Duration::from_millis(CLOSE_DEADLINE_MS), async {
        while let Some(Ok(_)) = socket.next().await {}
    })
    .await;
}

/// A group of connections driven through one plan.
struct Group {
    peers: Vec<Peer>,
    records: Arc<Records>,
    plan: watch::Sender<Plan>,
    tasks: Vec<JoinHandle<()>>,
}

impl Group {
    /// Start a task per connection; they open at most [`OPEN_IN_FLIGHT_MAX`] at a time.
    fn start(shared: Arc<Shared>, peers: Vec<Peer>) -> Self {
        let records =
            Arc::new(Records { slots: peers.iter().map(|_| Mutex::default()).collect(), ..Default::default() });
        let (plan, _) = watch::channel(Plan::Open);
        let opening = Arc::new(Semaphore::new(OPEN_IN_FLIGHT_MAX));
        let tasks = peers
            .iter()
            .map(|&peer| {
                let connection = Connection {
                    shared: shared.clone(),
                    records: records.clone(),
                    peer,
                    plan: plan.subscribe(),
                    state: State::default(),
                };
                tokio::spawn(connection.run(opening.clone()))
            })
            .collect();
        Self { peers, records, plan, tasks }
    }

    /// Wait until every connection is open or has failed: how many opened.
    async fn wait_opened(&self) -> anyhow::Result<usize> {
        let records = &self.records;
        let settled = || records.opened.load(Ordering::Relaxed) + records.failed.load(Ordering::Relaxed);
        wait_until("connections to open", OPEN_DEADLINE_MS, || settled() >= self.peers.len()).await?;
        Ok(records.opened.load(Ordering::Relaxed))
    }

    /// Tell the connections to subscribe; wait until every open one has caught up.
    async fn subscribe(&self) -> anyhow::Result<()> {
        self.plan.send_replace(Plan::Subscribe);
        let records = &self.records;
        wait_until("subscriptions to catch up", OPEN_DEADLINE_MS, || {
            records.caught_up.load(Ordering::Relaxed) >= records.opened.load(Ordering::Relaxed)
        })
        .await
    }

    fn opened_per_node(&self, nodes: usize) -> Vec<usize> {
        let mut counts = vec![0; nodes];
        for peer in &self.peers {
            if self.records.slot(*peer).opened {
                counts[peer.node as usize] += 1;
            }
        }
        counts
    }

    /// Print what went wrong since the last report: connections that failed to open, broke or
    /// had their subscription ended, and errors outside a run.
    fn print_trouble(&self) {
        let records = &self.records;
        let failed = records.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = records.first_failure.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(first) = first {
                println!("    {failed} connections failed to open; the first: {first}");
            }
        }
        for (what, counter) in
            [("connections reopened", &records.reconnects), ("subscriptions resumed", &records.resubscribes)]
        {
            let count = counter.swap(0, Ordering::Relaxed);
            if count > 0 {
                println!("    {count} {what}");
            }
        }
        print_counts(&records.take_errors());
    }

    /// Post for `seconds` from the first `posters` connections (each every `interval`, or as
    /// fast as it can); wait for every acknowledged post to reach every subscriber of its room;
    /// print what was measured.
    async fn run(
        &self,
        table: &mut Table,
        label: String,
        posters: usize,
        interval: Option<Duration>,
        seconds: u64,
    ) -> anyhow::Result<()> {
        let run = table.next_run();
        let records = &self.records;
        records.run.store(run, Ordering::Relaxed);
        records.delivered.store(0, Ordering::Relaxed);
        records.rate_limited.store(0, Ordering::Relaxed);
        let start = Instant::now() + Duration::from_millis(RUN_START_DELAY_MS);
        let stop = start + Duration::from_secs(seconds);
        self.plan.send_replace(Plan::Post(Run { run, posters: u32::try_from(posters)?, interval, start, stop }));
        tokio::time::sleep_until(stop.into()).await;
        // Posts still waiting for an answer or a retry settle first.
        let answered = wait_until("posts to be answered", DRAIN_DEADLINE_MS, || {
            records.posts_in_flight.load(Ordering::Relaxed) == 0
        })
        .await;
        let elapsed = start.elapsed().as_secs_f64();
        if let Err(e) = answered {
            println!("{e}: {} posts unanswered", records.posts_in_flight.load(Ordering::Relaxed));
        }

        // Every subscriber of a room is owed every acknowledged post of that room.
        let mut acked_by_room: HashMap<u32, HashSet<u64>> = HashMap::new();
        let mut ack_latencies = Vec::new();
        for peer in &self.peers {
            for acked in std::mem::take(&mut self.records.slot(*peer).acked) {
                if acked.run == run {
                    acked_by_room.entry(peer.room).or_default().insert(acked.key);
                    ack_latencies.push(Duration::from_micros(u64::from(acked.latency_us)));
                }
            }
        }
        let owed = |peer: &Peer| acked_by_room.get(&peer.room).map_or(0, HashSet::len) as u64;
        let expected: u64 = self.peers.iter().filter(|p| self.records.slot(**p).opened).map(owed).sum();
        let _ =
            wait_until("deliveries", DRAIN_DEADLINE_MS, || records.delivered.load(Ordering::Relaxed) >= expected).await;

        let mut delivery_latencies = Vec::new();
        let (mut missing, mut duplicates) = (0u64, 0u64);
        for peer in &self.peers {
            let (opened, received) = {
                let mut slot = self.records.slot(*peer);
                (slot.opened, std::mem::take(&mut slot.received))
            };
            if !opened {
                continue;
            }
            let mut seen = HashSet::with_capacity(received.len());
            for delivery in received.into_iter().filter(|d| d.run == run) {
                if seen.insert(delivery.key) {
                    delivery_latencies.push(Duration::from_micros(u64::from(delivery.latency_us)));
                } else {
                    duplicates += 1;
                }
            }
            if let Some(acked) = acked_by_room.get(&peer.room) {
                missing += acked.iter().filter(|key| !seen.contains(key)).count() as u64;
            }
        }
        ack_latencies.sort_unstable();
        delivery_latencies.sort_unstable();
        let errors = records.take_errors();
        let row = Row {
            label,
            connections: records.opened.load(Ordering::Relaxed),
            posts_per_second: ack_latencies.len() as f64 / elapsed,
            ack_p50_ms: quantile_ms(&ack_latencies, 0.50),
            ack_p99_ms: quantile_ms(&ack_latencies, 0.99),
            deliveries_per_second: delivery_latencies.len() as f64 / elapsed,
            delivery_p50_ms: quantile_ms(&delivery_latencies, 0.50),
            delivery_p99_ms: quantile_ms(&delivery_latencies, 0.99),
            missing,
            duplicates,
            rate_limited: records.rate_limited.load(Ordering::Relaxed),
            errors: errors.values().sum(),
        };
        table.print(&row);
        print_counts(&errors);
        self.print_trouble();
        Ok(())
    }

    /// Close every connection (close handshakes), then end their tasks.
    async fn close(self) {
        self.plan.send_replace(Plan::Close);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(CLOSE_DEADLINE_MS);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Poll `done` until it holds; `Err` past `deadline_ms`.
async fn wait_until(what: &str, deadline_ms: u64, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_millis(deadline_ms);
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "gave up waiting for {what} after {} s", deadline_ms / 1000);
        tokio::time::sleep(Duration::from_millis(POLL_INTERVAL_MS)).await;
    }
    Ok(())
}

/// What one run measured.
#[derive(Debug)]
struct Row {
    label: String,
    connections: usize,
    posts_per_second: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    deliveries_per_second: f64,
    delivery_p50_ms: f64,
    delivery_p99_ms: f64,
    missing: u64,
    duplicates: u64,
    rate_limited: u64,
    errors: u64,
}

fn print_counts(counts: &BTreeMap<String, u64>) {
    for (what, count) in counts {
        println!("    {count} x {what}");
    }
}

/// The table of runs: numbers them, prints its header above the first row.
#[derive(Debug, Default)]
struct Table {
    runs: u32,
}

impl Table {
    fn next_run(&mut self) -> u32 {
        self.runs += 1;
        self.runs
    }

    fn print(&self, row: &Row) {
        if self.runs == 1 {
            Self::print_header();
        }
        row.print();
    }

    fn print_header() {
        println!(
            "{:<22} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>6}",
            "run",
            "conns",
            "posts/s",
            "ack p50",
            "ack p99",
            "deliv/s",
            "e2e p50",
            "e2e p99",
            "missing",
            "dup",
            "limited",
            "errors"
        );
    }
}

impl Row {
    fn print(&self) {
        println!(
            "{:<22} {:>6} {:>8.0} {:>8.2} {:>8.2} {:>8.0} {:>8.2} {:>8.2} {:>8} {:>5} {:>7} {:>6}",
            self.label,
            self.connections,
            self.posts_per_second,
            self.ack_p50_ms,
            self.ack_p99_ms,
            self.deliveries_per_second,
            self.delivery_p50_ms,
            self.delivery_p99_ms,
            self.missing,
            self.duplicates,
            self.rate_limited,
            self.errors
        );
    }
}

/// The process ids of the nodes the bench started.
fn node_pids(cluster: &Cluster) -> Vec<u32> {
    cluster.processes.iter().filter_map(|p| p.child.id()).collect()
}

/// The resident set of process `pid` (or `self`), in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|line| line.strip_prefix("VmRSS:"))?;
    line.trim().strip_suffix("kB")?.trim().parse().ok()
}

/// The resident sets of the node processes together, in KiB; `None` without them.
fn nodes_rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| rss_kib(&pid.to_string())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_the_protocol_read_as_the_bench_needs() {
        // Shapes from docs/websocket.md.
        let event = r#"{"type": "event", "sub": 18, "room": "general", "event": {"kind": "message", "change": "posted", "position": {"wall_ms": 1795685031767, "logical": 0, "replica": 1, "counter": 1}, "message_id": "20cf01ea9768aadd44348046b50c9ae1", "actor": "ada", "message": {"message_id": "20cf01ea9768aadd44348046b50c9ae1", "position": {"wall_ms": 1795685031767, "logical": 0, "replica": 1, "counter": 1}, "author": "ada", "body": "bench 1 2 3 4 ", "edited": false, "redacted": false, "reactions": []}}}"#;
        let frame: Incoming = serde_json::from_str(event).expect("an event frame reads");
        assert_eq!((frame.kind.as_ref(), frame.sub), ("event", Some(18)));
        let event = frame.event.expect("an event");
        assert_eq!(event.change.as_deref(), Some("posted"));
        assert_eq!(event.position.map(|p| (p.replica, p.counter)), Some((1, 1)));
        assert_eq!(event.message.and_then(|m| parse_body(&m.body)), Some((1, 2, key(3, 4))));

        let limited = r#"{"type": "error", "id": 13, "error": {"code": "rate_limited", "message": "rate limit: retry after 50 ms", "retryable": true, "retry_after_ms": 50}}"#;
        let frame: Incoming = serde_json::from_str(limited).expect("an error frame reads");
        let error = frame.error.expect("an error");
        assert_eq!(
            (frame.id, error.code.as_ref(), error.retryable, error.retry_after_ms),
            (Some(13), "rate_limited", true, Some(50))
        );

        let malformed =
            r#"{"type": "error", "id": null, "error": {"code": "malformed", "message": "m", "retryable": false}}"#;
        let frame: Incoming = serde_json::from_str(malformed).expect("an error frame without id reads");
        assert_eq!(frame.id, None);

        let caught_up = r#"{"type": "event", "sub": 18, "room": "general", "event": {"kind": "caught_up", "version_vector": {"1": 4}}}"#;
        let frame: Incoming = serde_json::from_str(caught_up).expect("caught_up reads");
        assert_eq!(frame.event.map(|e| e.kind.into_owned()), Some("caught_up".to_string()));
    }
}
