//! A palaver node: one engine, the replicas it runs, its gRPC surfaces, its background work.
//!
//! [`Node::start`] takes everything from its caller — the engine, the bound listener, the
//! environment ([`NodeEnv`]: clock, randomness, dialer) — so tests and the simulator run real
//! nodes in-process; the `palaver` binary is a thin shell over it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use palaver_ids::{NodeId, RoomId, ShardId, UserName};
use palaver_proto::v1::JoinRequest;
use palaver_router::ShardRing;
use palaver_shard::types::RaftNode;
use palaver_shard::{Command, GroupCommit, KvEngine, Outcome, Refusal, ReplicaOptions};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::TokenSigner;
use crate::cluster::{self, ClusterView, MEMBERSHIP_CHANGES_IN_FLIGHT_MAX, NodeIdentity, RECONCILE_INTERVAL_MS};
use crate::env::NodeEnv;
use crate::error::ApiError;
use crate::peer::Peers;
use crate::replicas::ReplicaSet;

/// How a node without an identity becomes part of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// Create a new cluster with this many data shards; this node becomes node 1.
    InitCluster {
        /// Number of data shards (fixed for the cluster's life).
        shard_count: u32,
    },
    /// Join the cluster that the node at this address belongs to.
    Join {
        /// Any running node's gRPC address (`host:port`) or libp2p multiaddr
        /// (`/ip4/…/tcp/…/p2p/<peer id>`).
        seed: String,
    },
    /// Resume from the data directory; fail if it holds no identity.
    Resume,
}

/// A node's settings.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the data lives (for logs and messages; the engine is passed separately).
    pub data_dir: PathBuf,
    /// The gRPC address peers and clients use to reach this node (`host:port`).
    pub advertise_addr: String,
    /// How to join a cluster on first start (ignored once the node has an identity).
    pub bootstrap: Bootstrap,
    /// Replica tunables.
    pub replica: ReplicaOptions,
    /// Where the libp2p swarm listens (a multiaddr; port 0 picks one). `None` runs the node
    /// without a DHT: routes then come from the meta group alone.
    pub p2p_listen: Option<String>,
    /// The HTTP surface (web page, WebSocket, HTTP API, metrics); `None` serves none.
    pub http: Option<crate::http::HttpOptions>,
    /// Most gRPC connections open at once from one client address
    /// ([`crate::connections::GRPC_CONNECTIONS_PER_ADDRESS_DEFAULT`]).
    pub grpc_connections_per_address: usize,
}

/// Errors that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data directory holds no identity and no way to get one was given.
    #[error("{0}")]
    NoIdentity(String),
    /// Joining or initializing the cluster failed.
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] palaver_shard::StorageError),
    /// A replica did not start.
    #[error(transparent)]
    Replica(#[from] palaver_shard::StartError),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Server(String),
}

/// Shared state of a running node, used by its services and background tasks.
#[derive(Debug)]
pub struct NodeInner {
    /// This node's id.
    pub id: NodeId,
    /// Its persisted identity.
    pub identity: NodeIdentity,
    /// Where peers and clients reach it.
    pub advertise_addr: String,
    /// Clock, randomness, dialer.
    pub env: NodeEnv,
    /// The replicas it runs.
    pub replicas: ReplicaSet,
    /// Room and user -> shard.
    pub ring: ShardRing,
    /// Signs and verifies login tokens.
    pub signer: TokenSigner,
    /// Threads for password hashes (register, login).
    pub hashes: crate::auth::HashPool,
    /// Addresses to ask for the cluster map before the view knows any node.
    pub seeds: Vec<String>,
    /// Per-user write rate limits.
    pub rate_limiter: crate::limits::RateLimiter,
    /// CRDT pushers, one per (local replica, peer).
    pub replication: crate::replication::Replication,
    /// The routing plane: the DHT, the route cache, what this node publishes.
    pub directory: crate::directory::Directory,
    /// Room feeds for local subscribers of rooms this node holds no replica of.
    pub feeds: crate::feed::Feeds,
    /// Where browsers and HTTP clients reach it (`host:port`), if it serves HTTP.
    pub http_addr: Option<String>,
    /// Request counters and latency histograms of the client surfaces.
    pub metrics: crate::metrics::Metrics,
    /// Idle Raft groups asleep, led and followed.
    pub quiesce: Arc<crate::quiesce::Quiesce>,
    /// Random per start: with `request_seq`, identifies the commands this node submits.
    request_boot: u64,
    request_seq: std::sync::atomic::AtomicU64,
    view: RwLock<ClusterView>,
    membership_changes: Mutex<BTreeSet<ShardId>>,
    subscriptions: Mutex<BTreeMap<UserName, BTreeMap<RoomId, usize>>>,
}

/// Keeps a subscription counted in [`NodeInner`] while it lives.
#[derive(Debug)]
pub struct SubscriptionGuard {
    node: Arc<NodeInner>,
    user: UserName,
    room: RoomId,
}

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        let mut subscriptions = self.node.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rooms) = subscriptions.get_mut(&self.user) {
            if let Some(count) = rooms.get_mut(&self.room) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    rooms.remove(&self.room);
                }
            }
            if rooms.is_empty() {
                subscriptions.remove(&self.user);
            }
        }
    }
}

impl NodeInner {
    /// The cluster view.
    pub fn view(&self) -> RwLockReadGuard<'_, ClusterView> {
        self.view.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn view_mut(&self) -> RwLockWriteGuard<'_, ClusterView> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The last leader seen for `shard`.
    pub fn leader_hint(&self, shard: ShardId) -> Option<NodeId> {
        self.directory.cache.peek(shard).and_then(|route| route.leader)
    }

    /// Remember (or forget) the leader of `shard`.
    pub fn set_leader_hint(&self, shard: ShardId, leader: Option<NodeId>) {
        self.directory.cache.set_leader(shard, leader);
    }

    pub(crate) fn begin_membership_change(&self, shard: ShardId) -> bool {
        let mut changes = self.membership_changes.lock().unwrap_or_else(|p| p.into_inner());
        if changes.len() >= MEMBERSHIP_CHANGES_IN_FLIGHT_MAX {
            return false;
        }
        changes.insert(shard)
    }

    pub(crate) fn end_membership_change(&self, shard: ShardId) {
        self.membership_changes.lock().unwrap_or_else(|p| p.into_inner()).remove(&shard);
    }

    /// Count a subscription of `user` to `room` until the guard drops.
    pub fn register_subscription(self: &Arc<Self>, user: &UserName, room: &RoomId) -> SubscriptionGuard {
        let mut subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        *subscriptions.entry(user.clone()).or_default().entry(room.clone()).or_default() += 1;
        SubscriptionGuard { node: self.clone(), user: user.clone(), room: room.clone() }
    }

    /// Client subscriptions open on this node.
    pub fn subscription_count(&self) -> u64 {
        let subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        subscriptions.values().flat_map(|rooms| rooms.values()).map(|n| *n as u64).sum()
    }

    /// The rooms `user` is subscribed to on this node.
    pub fn subscribed_rooms(&self, user: &UserName) -> Vec<String> {
        let subscriptions = self.subscriptions.lock().unwrap_or_else(|p| p.into_inner());
        subscriptions.get(user).map(|rooms| rooms.keys().map(|r| r.0.clone()).collect()).unwrap_or_default()
    }

    /// This node's replica of `shard` if it serves clients: placement (the meta group's
    /// registry) names this node for the shard, and the group counts it as a voter. A copy
    /// left behind when the shard moved away keeps running (the drain issue will wipe it) but
    /// no longer gets its peers' events — and may never learn that it was removed, so its own
    /// view of the membership is not enough — so clients must not read or write through it.
    pub fn serving_replica(&self, shard: ShardId) -> Option<palaver_shard::Replica> {
        let replica = self.replicas.get(shard)?;
        {
            let view = self.view();
            if view.info.is_some() && !view.placement(shard).contains(&self.id) {
                return None;
            }
        }
        let voter = {
            let metrics = replica.raft.metrics();
            let metrics = openraft::async_runtime::WatchReceiver::borrow_watched(&metrics);
            metrics.membership_config.membership().voter_ids().any(|id| id == self.id.0)
        };
        voter.then_some(replica)
    }

    /// Milliseconds since the Unix epoch, from the injected clock.
    pub fn now_ms(&self) -> u64 {
        self.env.clock.now_ms()
    }

    /// `command` with a fresh request identity of this node, so that the routing layer's
    /// retries of it are answered with its first outcome (see [`palaver_shard::RequestId`]).
    pub fn identify(&self, command: Command) -> Command {
        let seq = self.request_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = palaver_shard::RequestId { origin: self.id.0, boot: self.request_boot, seq };
        Command::Request { id, at_ms: self.now_ms(), command: Box::new(command) }
    }
}

/// The address to advertise for a listener bound to `bound`: itself, unless it is a wildcard
/// address, then the host others reach the node's gRPC address at.
fn advertised(bound: std::net::SocketAddr, grpc_advertise: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let host = grpc_advertise.rsplit_once(':').map_or(grpc_advertise, |(host, _)| host);
    format!("{host}:{}", bound.port())
}

/// A running node. Dropping it does not stop it; call [`Node::shutdown`].
#[derive(Debug)]
pub struct Node {
    inner: Arc<NodeInner>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    local_addr: std::net::SocketAddr,
}

impl Node {
    /// Start a node on `engine`, serving on `listener`.
    pub async fn start(
        config: NodeConfig,
        env: NodeEnv,
        engine: Arc<dyn KvEngine>,
        listener: TcpListener,
    ) -> Result<Node, NodeError> {
        let local_addr = listener.local_addr().map_err(|e| NodeError::Server(e.to_string()))?;
        // Whatever a crash left written but not fsynced becomes durable before anything is
        // served from it (CRDT events on disk are sent to peers and subscribers as durable).
        engine.sync()?;
        palaver_shard::engine::ensure_layout(engine.as_ref())?;
        let group_commit = GroupCommit::start(engine.clone());
        let identity = NodeIdentity::load(engine.as_ref())?;
        // The life first: a data directory from before its counter reads the boot count.
        let life = crate::replicas::begin_life(engine.as_ref())?;
        let boot = crate::directory::next_boot(engine.as_ref())?;
        let dht = match &config.p2p_listen {
            Some(listen) => Some(start_dht(engine.as_ref(), &env, listen).await?),
            None => None,
        };
        let mut seeds = Vec::new();
        let mut p2p_seeds = Vec::new();
        let (identity, replicas) = match (identity, &config.bootstrap) {
            (Some(identity), _) => {
                let peers = Arc::new(Peers::new(identity.node_id.0, env.dialer.clone()));
                let replicas =
                    ReplicaSet::new(identity.node_id, life, engine.clone(), group_commit, peers, config.replica);
                replicas.restore(identity.shard_count).await?;
                tracing::info!(node = %identity.node_id, "resumed from the data directory");
                (identity, replicas)
            }
            (None, Bootstrap::InitCluster { shard_count }) => {
                init_cluster(&config, &env, engine.clone(), group_commit, *shard_count, life).await?
            }
            (None, Bootstrap::Join { seed }) => {
                let seed = if seed.starts_with('/') {
                    let dht = dht.as_ref().ok_or_else(|| {
                        NodeError::Bootstrap(format!(
                            "--join {seed} is a multiaddr: the node needs its DHT (--p2p-addr)"
                        ))
                    })?;
                    crate::directory::grpc_addr_behind(dht, seed).await.map_err(NodeError::Bootstrap)?
                } else {
                    seed.clone()
                };
                seeds.push(seed.clone());
                let (identity, seed_p2p) = join_cluster(&config, &env, &seed).await?;
                p2p_seeds = seed_p2p;
                identity.store(engine.as_ref())?;
                let peers = Arc::new(Peers::new(identity.node_id.0, env.dialer.clone()));
                let replicas =
                    ReplicaSet::new(identity.node_id, life, engine.clone(), group_commit, peers, config.replica);
                (identity, replicas)
            }
            (None, Bootstrap::Resume) => {
                return Err(NodeError::NoIdentity(format!(
                    "{} holds no node: start with --init-cluster or --join",
                    config.data_dir.display()
                )));
            }
        };
        let http = match &config.http {
            Some(options) => {
                let listener = TcpListener::bind(&options.listen)
                    .await
                    .map_err(|e| NodeError::Server(format!("HTTP address {}: {e}", options.listen)))?;
                let bound = listener.local_addr().map_err(|e| NodeError::Server(e.to_string()))?;
                Some((listener, options.clone(), advertised(bound, &config.advertise_addr)))
            }
            None => None,
        };
        let http_addr = http.as_ref().map(|(_, _, addr)| addr.clone());
        let request_boot = u64::from_be_bytes(env.rng.bytes(8).try_into().unwrap_or([0; 8]));
        let directory = crate::directory::Directory::new(dht, &identity.token_secret, boot);
        if let Some(dht) = &directory.dht {
            crate::directory::dial_all(dht, &p2p_seeds).await;
        }
        let inner = Arc::new(NodeInner {
            id: identity.node_id,
            ring: ShardRing::new(identity.shard_count),
            signer: TokenSigner::new(identity.token_secret.clone()),
            hashes: crate::auth::HashPool::start().map_err(NodeError::Server)?,
            identity,
            advertise_addr: config.advertise_addr.clone(),
            env,
            replicas,
            seeds,
            rate_limiter: crate::limits::RateLimiter::default(),
            replication: crate::replication::Replication::default(),
            directory,
            feeds: crate::feed::Feeds::default(),
            http_addr,
            metrics: crate::metrics::Metrics::default(),
            quiesce: Arc::default(),
            request_boot,
            request_seq: std::sync::atomic::AtomicU64::new(0),
            view: RwLock::new(ClusterView::default()),
            membership_changes: Mutex::new(BTreeSet::new()),
            subscriptions: Mutex::new(BTreeMap::new()),
        });
        let (stop, stopped) = watch::channel(false);
        let per_address = crate::limits::PerAddress::new(config.grpc_connections_per_address);
        let mut tasks = vec![tokio::spawn(crate::grpc::serve(inner.clone(), listener, per_address, stopped.clone()))];
        if let Some((listener, options, addr)) = http {
            tracing::info!(node = %inner.id, %addr, "HTTP surface listening");
            tasks.push(tokio::spawn(crate::http::serve(inner.clone(), listener, options, stopped.clone())));
        }
        tasks.push(tokio::spawn(crate::quiesce::run(inner.clone(), stopped.clone())));
        tasks.push(tokio::spawn(reconcile_loop(inner.clone(), stopped)));
        tracing::info!(node = %inner.id, addr = %inner.advertise_addr, "node started");
        Ok(Node { inner, stop, tasks, local_addr })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.local_addr
    }

    /// Shared state, for in-process callers (tests, the simulator).
    pub fn inner(&self) -> &Arc<NodeInner> {
        &self.inner
    }

    /// Stop serving, stop background work, stop every replica.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        self.inner.replication.shutdown().await;
        self.inner.replicas.shutdown().await;
        self.inner.replicas.peers().close();
        tracing::info!(node = %self.inner.id, "node stopped");
    }
}

async fn reconcile_loop(node: Arc<NodeInner>, mut stopped: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(RECONCILE_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                cluster::reconcile_once(&node).await;
                node.replication.ensure_pushers(&node, &stopped);
                crate::directory::publish(&node);
                crate::directory::keep_connected(&node);
            }
            _ = stopped.changed() => return,
        }
    }
}

/// Create a cluster: this node becomes node 1, every shard group starts with it as sole voter,
/// and the meta group commits the cluster record. Safe to repeat after a crash half-way.
async fn init_cluster(
    config: &NodeConfig,
    env: &NodeEnv,
    engine: Arc<dyn KvEngine>,
    group_commit: GroupCommit,
    shard_count: u32,
    life: u64,
) -> Result<(NodeIdentity, ReplicaSet), NodeError> {
    if !(1..=palaver_router::SHARD_COUNT_MAX).contains(&shard_count) {
        return Err(NodeError::Bootstrap(format!(
            "--shards must be 1 to {}, got {shard_count}",
            palaver_router::SHARD_COUNT_MAX
        )));
    }
    let node_id = NodeId(1);
    let peers = Arc::new(Peers::new(node_id.0, env.dialer.clone()));
    let replicas = ReplicaSet::new(node_id, life, engine.clone(), group_commit, peers, config.replica);
    let members = BTreeMap::from([(node_id.0, RaftNode { addr: config.advertise_addr.clone() })]);
    for shard in (0..=shard_count).map(ShardId) {
        let replica = replicas.ensure(shard).await?;
        if let Err(e) = replica.raft.initialize(members.clone()).await {
            // Already initialized: a repeated --init-cluster after a crash half-way.
            tracing::debug!(%shard, error = %e, "initialize skipped");
        }
    }
    let meta = replicas.ensure(ShardId::META).await?;
    // `initialize` returns before the single voter has elected itself: wait for that, or the
    // first write would be told to forward to a leader that does not exist yet.
    meta.raft
        .wait(Some(Duration::from_millis(JOIN_DEADLINE_MS)))
        .current_leader(node_id.0, "the meta group elects its first node")
        .await
        .map_err(|e| NodeError::Bootstrap(e.to_string()))?;
    let init =
        Command::InitCluster { cluster_id: hex(&env.rng.bytes(8)), token_secret: env.rng.bytes(32), shard_count };
    let write = |command: Command| {
        let raft = meta.raft.clone();
        async move { raft.client_write(command).await.map(|r| r.data).map_err(|e| NodeError::Bootstrap(e.to_string())) }
    };
    match write(init).await? {
        Outcome::Done | Outcome::Refused(Refusal::AlreadyInitialized) => {}
        other => return Err(NodeError::Bootstrap(format!("InitCluster: {other:?}"))),
    }
    let add = Command::AddNode { grpc_addr: config.advertise_addr.clone(), at_ms: env.clock.now_ms() };
    match write(add).await? {
        Outcome::NodeAdded(id) if id == node_id => {}
        other => return Err(NodeError::Bootstrap(format!("AddNode for the first node: {other:?}"))),
    }
    let info = meta
        .state
        .read()
        .meta
        .cluster()
        .cloned()
        .ok_or_else(|| NodeError::Bootstrap("cluster record missing after InitCluster".into()))?;
    let identity = NodeIdentity {
        node_id,
        cluster_id: info.cluster_id,
        token_secret: info.token_secret,
        shard_count: info.shard_count,
    };
    identity.store(engine.as_ref())?;
    tracing::info!(cluster = %identity.cluster_id, shards = shard_count, "cluster initialized");
    Ok((identity, replicas))
}

/// Time a joining node keeps retrying its seed.
pub const JOIN_DEADLINE_MS: u64 = 30_000;

/// Start the node's swarm on `listen` with its persistent key.
async fn start_dht(engine: &dyn KvEngine, env: &NodeEnv, listen: &str) -> Result<palaver_router::Dht, NodeError> {
    let keypair = crate::directory::load_or_create_key(engine, &env.rng)?;
    let listen = listen.parse().map_err(|e| NodeError::Server(format!("--p2p-addr {listen}: {e}")))?;
    let config = palaver_router::DhtConfig {
        keypair,
        listen,
        seal: None,
        agent: format!("palaver/{}", env!("CARGO_PKG_VERSION")),
    };
    palaver_router::Dht::start(config).await.map_err(|e| NodeError::Server(e.to_string()))
}

/// Join through `seed`; returns the identity and the seed's libp2p addresses.
async fn join_cluster(
    config: &NodeConfig,
    env: &NodeEnv,
    seed: &str,
) -> Result<(NodeIdentity, Vec<String>), NodeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(JOIN_DEADLINE_MS);
    let mut last_error = String::new();
    while tokio::time::Instant::now() < deadline {
        let channel = env.dialer.channel(seed).map_err(NodeError::Bootstrap)?;
        let mut client = palaver_proto::v1::peer_service_client::PeerServiceClient::new(channel);
        match client.join(JoinRequest { grpc_addr: config.advertise_addr.clone() }).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                tracing::info!(node = reply.node_id, %seed, "joined the cluster");
                let identity = NodeIdentity {
                    node_id: NodeId(reply.node_id),
                    cluster_id: reply.cluster_id,
                    token_secret: reply.token_secret,
                    shard_count: reply.shard_count,
                };
                return Ok((identity, reply.p2p_addrs));
            }
            Err(status) => {
                last_error = status.message().to_owned();
                tracing::info!(%seed, error = %last_error, "join not accepted yet; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Err(NodeError::Bootstrap(format!("could not join through {seed}: {last_error}")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<NodeError> for ApiError {
    fn from(error: NodeError) -> Self {
        ApiError::Internal(error.to_string())
    }
}
