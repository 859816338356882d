//! The node's side of the routing plane: its libp2p identity, the records it publishes in the
//! DHT, and resolving a shard's replicas and a node's address from anywhere.
//!
//! - **Identity**: an ed25519 key kept in the engine's `node` family (so in the data dir),
//!   created on first start from the node's randomness; a boot counter beside it is the epoch
//!   of the node's own record, so a record of an earlier start never wins.
//! - **Publishing** ([`publish`], every [`crate::cluster::RECONCILE_INTERVAL_MS`]): the node's
//!   record under its id and its peer id; for each shard it leads, the directory record
//!   (replicas, leader, epoch = term and membership index) whenever it changed, and every record
//!   again every [`REPUBLISH_INTERVAL_MS`], well before [`palaver_router::dht::RECORD_TTL_SECS`].
//! - **Resolving** ([`resolve_shard`]): the route cache, then the DHT (newest valid record,
//!   within [`DHT_LOOKUP_TIMEOUT_MS`]), then the meta group's placement. The routing layer
//!   corrects the cache from the answers it gets.
//! - **Staying connected** ([`keep_connected`]): while the routing table lacks known nodes, ask
//!   them over gRPC (`ClusterMap`) for their libp2p addresses and dial them: a node restarted
//!   on new ports is found again without operator action.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::identity::Keypair;
use openraft::async_runtime::WatchReceiver;
use palaver_ids::{NodeId, ShardId};
use palaver_proto::v1::ClusterMapRequest;
use palaver_router::{Dht, Entry, NodeRecord, RecordKey, RecordSeal, Route, RouteCache, ShardEpoch, ShardRecord};
use palaver_shard::{Cf, KvEngine, StorageError, WriteBatch};

use crate::env::SharedRng;
use crate::lock;
use crate::node::NodeInner;

/// Every published record is put again this often.
pub const REPUBLISH_INTERVAL_MS: u64 = 60_000;
/// Longest wait for a DHT lookup before falling back to the meta group's placement.
pub const DHT_LOOKUP_TIMEOUT_MS: u64 = 2_000;
/// Least time between two attempts to reach nodes missing from the routing table.
pub const RECONNECT_INTERVAL_MS: u64 = 5_000;

const _: () = assert!(REPUBLISH_INTERVAL_MS < palaver_router::dht::RECORD_TTL_SECS * 1_000 / 4);

/// Key of the node's libp2p key in the `node` family.
const P2P_KEY: &[u8] = b"p2p_key";
/// Key of the node's boot counter in the `node` family.
pub(crate) const BOOT_COUNT_KEY: &[u8] = b"boot_count";

/// The node's libp2p key, created and persisted on first use.
pub fn load_or_create_key(engine: &dyn KvEngine, rng: &SharedRng) -> Result<Keypair, StorageError> {
    if let Some(bytes) = engine.get(Cf::Node, P2P_KEY)? {
        return Keypair::from_protobuf_encoding(&bytes).map_err(|e| StorageError::corrupt(format!("p2p key: {e}")));
    }
    let mut secret = rng.bytes(32);
    let keypair =
        Keypair::ed25519_from_bytes(&mut secret).map_err(|e| StorageError::corrupt(format!("p2p key: {e}")))?;
    let encoded = keypair.to_protobuf_encoding().map_err(|e| StorageError::corrupt(format!("p2p key: {e}")))?;
    let mut batch = WriteBatch::new();
    batch.put(Cf::Node, P2P_KEY.to_vec(), encoded);
    engine.write(batch)?;
    engine.sync()?;
    Ok(keypair)
}

/// Count this start and return its number (1 for the first).
pub fn next_boot(engine: &dyn KvEngine) -> Result<u64, StorageError> {
    let boot = read_counter(engine, BOOT_COUNT_KEY)?.unwrap_or(0) + 1;
    let mut batch = WriteBatch::new();
    batch.put(Cf::Node, BOOT_COUNT_KEY.to_vec(), boot.to_be_bytes().to_vec());
    engine.write(batch)?;
    engine.sync()?;
    Ok(boot)
}

/// A `u64` counter the node keeps in its `node` family, if set.
pub(crate) fn read_counter(engine: &dyn KvEngine, key: &[u8]) -> Result<Option<u64>, StorageError> {
    Ok(engine.get(Cf::Node, key)?.and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok()).map(u64::from_be_bytes))
}

/// What the node published last, per record key, and when.
#[derive(Debug, Default)]
struct Published {
    shards: BTreeMap<ShardId, (ShardRecord, u64)>,
    node_at_ms: Option<u64>,
    reconnect_at_ms: u64,
}

/// The routing plane as the node holds it.
#[derive(Debug)]
pub struct Directory {
    /// The node's swarm (absent for nodes started without one, e.g. some in-process tests).
    pub dht: Option<Dht>,
    /// Routes learned.
    pub cache: RouteCache,
    seal: RecordSeal,
    boot: u64,
    published: Mutex<Published>,
    nodes: Mutex<BTreeMap<NodeId, NodeRecord>>,
    dht_lookups: AtomicU64,
    dht_found: AtomicU64,
    meta_fallbacks: AtomicU64,
}

impl Directory {
    /// The directory of a node whose cluster secret is `secret`.
    pub fn new(dht: Option<Dht>, secret: &[u8], boot: u64) -> Self {
        let seal = RecordSeal::new(secret);
        if let Some(dht) = &dht {
            dht.set_seal(seal.clone());
        }
        Self {
            dht,
            cache: RouteCache::default(),
            seal,
            boot,
            published: Mutex::new(Published::default()),
            nodes: Mutex::new(BTreeMap::new()),
            dht_lookups: AtomicU64::new(0),
            dht_found: AtomicU64::new(0),
            meta_fallbacks: AtomicU64::new(0),
        }
    }

    /// The swarm's addresses, as strings (empty without a swarm).
    pub fn p2p_addrs(&self) -> Vec<String> {
        self.dht.as_ref().map(|d| d.listen_addrs().iter().map(ToString::to_string).collect()).unwrap_or_default()
    }

    /// The node's peer id (empty without a swarm).
    pub fn peer_id(&self) -> String {
        self.dht.as_ref().map(|d| d.peer_id().to_string()).unwrap_or_default()
    }

    /// The peer ids in the routing table.
    pub fn dht_peers(&self) -> Vec<String> {
        self.dht.as_ref().map(|d| d.peers().into_iter().map(|p| p.peer_id).collect()).unwrap_or_default()
    }

    /// Route counters, cache and DHT together.
    pub fn counters(&self) -> palaver_proto::v1::RouteCounters {
        let cache = self.cache.counters();
        palaver_proto::v1::RouteCounters {
            cache_hits: cache.cache_hits,
            cache_misses: cache.cache_misses,
            corrections: cache.corrections,
            dht_lookups: self.dht_lookups.load(Ordering::Relaxed),
            dht_found: self.dht_found.load(Ordering::Relaxed),
            meta_fallbacks: self.meta_fallbacks.load(Ordering::Relaxed),
            epoch_hints: cache.epoch_hints,
        }
    }

    /// The newest valid entry under `key` in the DHT.
    pub async fn lookup(&self, key: &RecordKey) -> Option<Entry> {
        let dht = self.dht.as_ref()?;
        let key_bytes = key.to_bytes();
        let values = tokio::time::timeout(Duration::from_millis(DHT_LOOKUP_TIMEOUT_MS), dht.get(key_bytes.clone()))
            .await
            .ok()?
            .ok()?;
        let mut newest: Option<Entry> = None;
        for value in values {
            match self.seal.open(&key_bytes, &value) {
                Ok((_, entry)) if newest.as_ref().is_none_or(|held| entry.newer_or_equal(held)) => {
                    newest = Some(entry);
                }
                Ok(_) => {}
                Err(e) => tracing::info!(%key, error = %e, "ignored a DHT record"),
            }
        }
        newest
    }

    /// The shard's directory record in the DHT.
    pub async fn lookup_shard(&self, shard: ShardId) -> Option<ShardRecord> {
        self.dht_lookups.fetch_add(1, Ordering::Relaxed);
        match self.lookup(&RecordKey::Shard(shard)).await {
            Some(Entry::Shard(record)) => {
                self.dht_found.fetch_add(1, Ordering::Relaxed);
                Some(record)
            }
            _ => None,
        }
    }

    /// Publish `entry` under `key` in the background: a put waits on the closest peers, and a
    /// dead or cut-off one must not hold up the reconcile loop that publishes.
    fn put(&self, key: RecordKey, entry: &Entry) {
        let Some(dht) = self.dht.clone() else { return };
        let value = self.seal.seal(&key, entry);
        tokio::spawn(async move {
            if let Err(e) = dht.put(key.to_bytes(), value).await {
                tracing::warn!(%key, error = %e, "record not published");
            }
        });
    }
}

/// Where `shard` lives: the route cache, else the DHT, else the meta group's placement.
pub async fn resolve_shard(node: &NodeInner, shard: ShardId) -> Route {
    let directory = &node.directory;
    if let Some(route) = directory.cache.lookup(shard) {
        return route;
    }
    // Boxed, like every DHT lookup on a request path: the lookup's future is large, and a
    // request's future (moved on every spawn and push) would otherwise carry it inline.
    if let Some(record) = Box::pin(directory.lookup_shard(shard)).await
        && record.cluster_id == node.identity.cluster_id
    {
        let route = Route::from(&record);
        directory.cache.offer(shard, route.clone());
        return directory.cache.peek(shard).unwrap_or(route);
    }
    directory.meta_fallbacks.fetch_add(1, Ordering::Relaxed);
    let route = Route { replicas: node.view().placement(shard), leader: None, epoch: ShardEpoch::default() };
    directory.cache.offer(shard, route.clone());
    route
}

/// The gRPC address of `id`: the meta group's registry, else the node's DHT record.
pub async fn node_addr(node: &NodeInner, id: NodeId) -> Option<String> {
    if let Some(addr) = node.view().addr(id) {
        return Some(addr);
    }
    let known = lock(&node.directory.nodes).get(&id).map(|r| r.grpc_addr.clone());
    if known.is_some() {
        return known;
    }
    match Box::pin(node.directory.lookup(&RecordKey::Node(id))).await {
        Some(Entry::Node(record)) if record.cluster_id == node.identity.cluster_id => {
            let addr = record.grpc_addr.clone();
            lock(&node.directory.nodes).insert(id, record);
            Some(addr)
        }
        _ => None,
    }
}

/// Publish what changed (or is due again): the node's own record, and the directory record of
/// every shard led here. Returns at once; the puts run in the background.
pub fn publish(node: &NodeInner) {
    let directory = &node.directory;
    let Some(dht) = &directory.dht else { return };
    let now_ms = node.now_ms();
    let due = |at: u64| now_ms.saturating_sub(at) >= REPUBLISH_INTERVAL_MS;
    let node_due = lock(&directory.published).node_at_ms.is_none_or(due);
    if node_due {
        let record = Entry::Node(NodeRecord {
            cluster_id: node.identity.cluster_id.clone(),
            node: node.id,
            peer_id: dht.peer_id().to_string(),
            grpc_addr: node.advertise_addr.clone(),
            http_addr: node.http_addr.clone(),
            p2p_addrs: directory.p2p_addrs(),
            epoch: directory.boot,
        });
        directory.put(RecordKey::Node(node.id), &record);
        directory.put(RecordKey::Peer(dht.peer_id().to_string()), &record);
        lock(&directory.published).node_at_ms = Some(now_ms);
    }
    for replica in node.replicas.all() {
        let Some(record) = led_shard_record(node, &replica) else { continue };
        let changed_or_due = match lock(&directory.published).shards.get(&replica.shard) {
            Some((held, at)) => *held != record || due(*at),
            None => true,
        };
        if !changed_or_due {
            continue;
        }
        directory.cache.offer(replica.shard, Route::from(&record));
        directory.put(RecordKey::Shard(replica.shard), &Entry::Shard(record.clone()));
        lock(&directory.published).shards.insert(replica.shard, (record, now_ms));
    }
}

/// The shard's record as `replica` knows it now (its voters, the leader it knows, and its
/// epoch: current term, membership log index; a follower's view, not only a leader's), if that
/// epoch is newer than `than`. Answers every forwarded call, so the record is built only when
/// it will be sent.
pub fn newer_shard_record(node: &NodeInner, replica: &palaver_shard::Replica, than: ShardEpoch) -> Option<ShardRecord> {
    let metrics = replica.raft.metrics();
    let metrics = metrics.borrow_watched();
    (epoch_of(&metrics) > than).then(|| shard_record(node, replica.shard, &metrics))
}

/// The directory record of `replica`'s shard, if this node leads it.
fn led_shard_record(node: &NodeInner, replica: &palaver_shard::Replica) -> Option<ShardRecord> {
    let metrics = replica.raft.metrics();
    // One borrow, and no Raft call while it is held: the metrics live behind a fair RwLock, and
    // a second read (`is_leader` borrows them too) behind openraft's waiting writer deadlocks.
    let metrics = metrics.borrow_watched();
    let leads = metrics.current_leader == Some(node.id.0) && metrics.state == openraft::ServerState::Leader;
    leads.then(|| shard_record(node, replica.shard, &metrics))
}

fn epoch_of(metrics: &openraft::RaftMetrics<palaver_shard::types::TypeConfig>) -> ShardEpoch {
    let config_index = metrics.membership_config.log_id().as_ref().map_or(0, |id| id.index);
    ShardEpoch { term: metrics.current_term, config_index }
}

fn shard_record(
    node: &NodeInner,
    shard: ShardId,
    metrics: &openraft::RaftMetrics<palaver_shard::types::TypeConfig>,
) -> ShardRecord {
    let membership = &metrics.membership_config;
    ShardRecord {
        cluster_id: node.identity.cluster_id.clone(),
        shard,
        replicas: membership.membership().voter_ids().map(NodeId).collect(),
        leader: metrics.current_leader.map(NodeId),
        epoch: epoch_of(metrics),
    }
}

/// Dial the nodes the routing table lacks, asking each for its libp2p addresses over gRPC
/// (at most every [`RECONNECT_INTERVAL_MS`]), in the background: an unreachable node must not
/// hold up the reconcile loop.
pub fn keep_connected(node: &Arc<NodeInner>) {
    let node = node.clone();
    tokio::spawn(async move { reconnect(&node).await });
}

async fn reconnect(node: &NodeInner) {
    let Some(dht) = &node.directory.dht else { return };
    let now_ms = node.now_ms();
    {
        let mut published = lock(&node.directory.published);
        if now_ms.saturating_sub(published.reconnect_at_ms) < RECONNECT_INTERVAL_MS {
            return;
        }
        published.reconnect_at_ms = now_ms;
    }
    refresh_http_addrs(node).await;
    let others: Vec<String> =
        node.view().nodes().into_iter().filter(|(id, _)| *id != node.id).map(|(_, addr)| addr).collect();
    if dht.peers().len() >= others.len() {
        return;
    }
    for addr in others {
        let Ok(link) = node.replicas.peers().link(&addr) else { continue };
        let Ok(reply) = link.client().cluster_map(ClusterMapRequest {}).await else { continue };
        dial_all(dht, &reply.into_inner().p2p_addrs).await;
    }
}

/// Every node's HTTP address this node knows, by node id: its own, and the others' from their
/// DHT node records (looked up in the background by [`keep_connected`]). A web page learns the
/// list so that it can move to another node when its own dies.
pub fn http_addrs(node: &NodeInner) -> Vec<(NodeId, String)> {
    let known = lock(&node.directory.nodes);
    let mut addrs: Vec<(NodeId, String)> = node
        .view()
        .nodes()
        .into_keys()
        .filter_map(|id| {
            if id == node.id {
                return node.http_addr.clone().map(|addr| (id, addr));
            }
            known.get(&id).and_then(|record| record.http_addr.clone()).map(|addr| (id, addr))
        })
        .collect();
    if addrs.is_empty()
        && let Some(own) = &node.http_addr
    {
        addrs.push((node.id, own.clone()));
    }
    addrs
}

/// Look up the node records of registered nodes whose HTTP address is not known yet.
async fn refresh_http_addrs(node: &NodeInner) {
    let missing: Vec<NodeId> = {
        let known = lock(&node.directory.nodes);
        node.view()
            .nodes()
            .into_keys()
            .filter(|id| *id != node.id && known.get(id).is_none_or(|r| r.http_addr.is_none()))
            .collect()
    };
    let found = futures::future::join_all(missing.into_iter().map(|id| async move {
        match node.directory.lookup(&RecordKey::Node(id)).await {
            Some(Entry::Node(record)) if record.cluster_id == node.identity.cluster_id && record.node == id => {
                Some(record)
            }
            _ => None,
        }
    }))
    .await;
    let mut known = lock(&node.directory.nodes);
    for record in found.into_iter().flatten() {
        let newer = known.get(&record.node).is_none_or(|held| held.epoch <= record.epoch);
        if newer {
            known.insert(record.node, record);
        }
    }
}

/// Dial every address in `addrs` that parses; failures are logged.
pub async fn dial_all(dht: &Dht, addrs: &[String]) {
    for addr in addrs {
        match addr.parse() {
            Ok(multiaddr) => {
                if let Err(e) = dht.dial(multiaddr).await {
                    tracing::debug!(%addr, error = %e, "dial failed");
                }
            }
            Err(e) => tracing::warn!(%addr, error = %e, "not a multiaddr"),
        }
    }
}

/// The gRPC address of the node behind `multiaddr`, from its peer record in the DHT: how a
/// node started with `--join <multiaddr>` finds where to send its join. The record is read
/// without verifying its seal (the node has no cluster key yet); the address came from the
/// operator, who vouches for it as they would for a gRPC address.
pub async fn grpc_addr_behind(dht: &Dht, multiaddr: &str) -> Result<String, String> {
    let addr: libp2p::Multiaddr = multiaddr.parse().map_err(|e| format!("--join {multiaddr}: {e}"))?;
    let peer = palaver_router::dht::peer_of(&addr).ok_or_else(|| format!("--join {multiaddr}: no /p2p/<peer id>"))?;
    dht.dial(addr).await.map_err(|e| e.to_string())?;
    let key = RecordKey::Peer(peer.to_string());
    for _ in 0..20 {
        let values = dht.get(key.to_bytes()).await.map_err(|e| e.to_string())?;
        for value in values {
            if let Ok((_, Entry::Node(record))) = palaver_router::records::open_unverified(&key.to_bytes(), &value) {
                return Ok(record.grpc_addr);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("no node record for {peer} in the DHT"))
}

/// Every shard's directory record as this node's DHT lookups find it (for Status).
pub async fn directory_view(node: &NodeInner) -> BTreeMap<ShardId, Option<ShardRecord>> {
    let shards: Vec<ShardId> = (0..=node.identity.shard_count).map(ShardId).collect();
    let found = futures::future::join_all(shards.iter().map(|shard| async move {
        match node.directory.lookup(&RecordKey::Shard(*shard)).await {
            Some(Entry::Shard(record)) => Some(record),
            _ => None,
        }
    }))
    .await;
    shards.into_iter().zip(found).collect()
}
