//! The node's libp2p swarm: TCP + noise + yamux, with Kademlia (records and peer discovery),
//! identify (learn peers' listen addresses) and ping (liveness).
//!
//! One task owns the swarm; [`Dht`] is the handle the rest of the node uses: dial a seed, put a
//! sealed record, get the values stored under a key, list the peers in the routing table.
//!
//! Settings for small clusters, as the design asks: Kademlia in server mode from the start
//! (rust-libp2p stays a client until an external address is confirmed, which never happens on
//! loopback), a replication factor of [`DHT_REPLICATION`] and puts that succeed once one peer
//! stored the record. Incoming puts are filtered ([`kad::StoreInserts::FilterBoth`]): a value is
//! stored only if it opens with the cluster's [`RecordSeal`] and is not older than the value
//! already held ([`RecordSeal::accept`]). A node that has not joined yet (no seal) stores
//! nothing from others.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore};
use libp2p::kad::{self, GetRecordOk, InboundRequest, Mode, QueryId, QueryResult, Quorum, Record};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm, identify, noise, ping, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

use crate::records::{RECORD_VALUE_BYTES_MAX, RecordSeal};

/// The Kademlia protocol name: palaver's DHT is its own, not the IPFS one.
pub const KAD_PROTOCOL: &str = "/palaver/kad/1.0.0";
/// The identify protocol version.
pub const IDENTIFY_PROTOCOL: &str = "/palaver/1.0.0";
/// Peers a record is stored on (the design's min(N, 5): fewer nodes simply all hold it).
pub const DHT_REPLICATION: usize = 5;
/// How long a stored record lives without being republished.
pub const RECORD_TTL_SECS: u64 = 600;
/// How long one DHT query may take.
pub const QUERY_TIMEOUT_MS: u64 = 5_000;
/// How often the routing table is refreshed with a bootstrap query.
pub const BOOTSTRAP_INTERVAL_SECS: u64 = 30;
/// Once a get found a first value, how long it waits for more before answering with what it
/// has (a query that still waits on a dead peer must not hold routing up).
pub const GET_PATIENCE_MS: u64 = 300;
/// Connections without traffic close after this long.
const IDLE_CONNECTION_SECS: u64 = 300;
/// Most records one node stores (node and shard records of a large cluster fit many times).
const STORED_RECORDS_MAX: usize = 65_536;

/// The swarm's behaviours.
#[derive(NetworkBehaviour)]
struct Behaviour {
    kad: kad::Behaviour<MemoryStore>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
}

/// Why a DHT operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DhtError {
    /// The swarm could not start.
    #[error("libp2p: {0}")]
    Start(String),
    /// A multiaddr or dial was refused.
    #[error("dial {addr}: {reason}")]
    Dial {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The record could not be stored, not even locally.
    #[error("put: {0}")]
    Put(String),
    /// The swarm task is gone (the node is stopping).
    #[error("the DHT is stopped")]
    Stopped,
}

/// A peer in the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtPeer {
    /// Its peer id.
    pub peer_id: String,
    /// The addresses Kademlia knows for it.
    pub addrs: Vec<String>,
}

/// Settings of the swarm.
#[derive(Debug, Clone)]
pub struct DhtConfig {
    /// The node's persistent key.
    pub keypair: Keypair,
    /// Where to listen (`/ip4/127.0.0.1/tcp/0` picks a free port).
    pub listen: Multiaddr,
    /// The cluster's seal, once the node belongs to a cluster.
    pub seal: Option<RecordSeal>,
    /// What identify announces as the agent (e.g. `palaver/0.1.0`).
    pub agent: String,
}

enum Command {
    Dial(Multiaddr, oneshot::Sender<Result<(), DhtError>>),
    Put(Vec<u8>, Vec<u8>, oneshot::Sender<Result<(), DhtError>>),
    Get(Vec<u8>, mpsc::UnboundedSender<Vec<u8>>),
    SetSeal(RecordSeal),
}

#[derive(Debug, Default)]
struct Shared {
    listen_addrs: Vec<Multiaddr>,
    peers: Vec<DhtPeer>,
}

/// The handle on the node's swarm. Cloning shares it; the swarm stops when the last handle and
/// the task's stop signal are gone.
#[derive(Debug, Clone)]
pub struct Dht {
    peer_id: PeerId,
    commands: mpsc::UnboundedSender<Command>,
    shared: Arc<Mutex<Shared>>,
}

impl Dht {
    /// Build the swarm, start listening, and spawn its task. Returns once the listen address
    /// is known.
    pub async fn start(config: DhtConfig) -> Result<Dht, DhtError> {
        let peer_id = config.keypair.public().to_peer_id();
        let mut swarm = build_swarm(&config)?;
        swarm.listen_on(config.listen.clone()).map_err(|e| DhtError::Start(e.to_string()))?;
        // Wait for the listener's address (port 0 becomes a real port).
        let first = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    return address;
                }
            }
        })
        .await
        .map_err(|_| DhtError::Start(format!("no listen address on {}", config.listen)))?;
        let shared = Arc::new(Mutex::new(Shared { listen_addrs: vec![first], peers: Vec::new() }));
        let (commands, queue) = mpsc::unbounded_channel();
        let task = SwarmTask {
            swarm,
            seal: config.seal,
            shared: shared.clone(),
            puts: HashMap::new(),
            gets: HashMap::new(),
            dials: HashMap::new(),
        };
        tokio::spawn(task.run(queue));
        Ok(Dht { peer_id, commands, shared })
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Where the swarm listens, each with `/p2p/<peer id>` appended.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let shared = lock(&self.shared);
        shared.listen_addrs.iter().map(|a| a.clone().with_p2p(self.peer_id).unwrap_or_else(|a| a)).collect()
    }

    /// The peers in the routing table.
    pub fn peers(&self) -> Vec<DhtPeer> {
        lock(&self.shared).peers.clone()
    }

    /// Start verifying and storing others' records with `seal` (once the node joined).
    pub fn set_seal(&self, seal: RecordSeal) {
        let _ = self.commands.send(Command::SetSeal(seal));
    }

    /// Dial `addr` (which must end in `/p2p/<peer id>`), add it to the routing table and
    /// bootstrap from it. Returns once connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), DhtError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Dial(addr, reply)).map_err(|_| DhtError::Stopped)?;
        answer.await.map_err(|_| DhtError::Stopped)?
    }

    /// Store a sealed `value` under `key`, locally and on the closest peers.
    pub async fn put(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), DhtError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Put(key, value, reply)).map_err(|_| DhtError::Stopped)?;
        answer.await.map_err(|_| DhtError::Stopped)?
    }

    /// The values found under `key` (locally and on peers), unverified: the caller opens them
    /// with its seal and keeps the newest. Answers when the query ends, or [`GET_PATIENCE_MS`]
    /// after the first value arrived, whichever is first.
    pub async fn get(&self, key: Vec<u8>) -> Result<Vec<Vec<u8>>, DhtError> {
        let (reply, mut found) = mpsc::unbounded_channel();
        self.commands.send(Command::Get(key, reply)).map_err(|_| DhtError::Stopped)?;
        let mut values = Vec::new();
        let Some(first) = found.recv().await else { return Ok(values) };
        values.push(first);
        let patience = tokio::time::sleep(Duration::from_millis(GET_PATIENCE_MS));
        tokio::pin!(patience);
        loop {
            tokio::select! {
                value = found.recv() => match value {
                    Some(value) => values.push(value),
                    None => return Ok(values),
                },
                () = &mut patience => return Ok(values),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn build_swarm(config: &DhtConfig) -> Result<Swarm<Behaviour>, DhtError> {
    let start = |e: &dyn std::fmt::Display| DhtError::Start(e.to_string());
    let agent = config.agent.clone();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.keypair.clone())
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| start(&e))?
        .with_behaviour(move |key| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_config
                .set_replication_factor(NonZeroUsize::new(DHT_REPLICATION).unwrap_or(NonZeroUsize::MIN))
                .set_query_timeout(Duration::from_millis(QUERY_TIMEOUT_MS))
                .set_record_ttl(Some(Duration::from_secs(RECORD_TTL_SECS)))
                .set_record_filtering(kad::StoreInserts::FilterBoth)
                .set_max_packet_size(4 * RECORD_VALUE_BYTES_MAX)
                .set_periodic_bootstrap_interval(Some(Duration::from_secs(BOOTSTRAP_INTERVAL_SECS)));
            let store_config = MemoryStoreConfig {
                max_records: STORED_RECORDS_MAX,
                max_value_bytes: RECORD_VALUE_BYTES_MAX,
                ..MemoryStoreConfig::default()
            };
            let mut kad =
                kad::Behaviour::with_config(peer_id, MemoryStore::with_config(peer_id, store_config), kad_config);
            kad.set_mode(Some(Mode::Server));
            let identify = identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public()).with_agent_version(agent),
            );
            Behaviour { kad, identify, ping: ping::Behaviour::default() }
        })
        .map_err(|e| start(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(IDLE_CONNECTION_SECS)))
        .build();
    Ok(swarm)
}

struct SwarmTask {
    swarm: Swarm<Behaviour>,
    seal: Option<RecordSeal>,
    shared: Arc<Mutex<Shared>>,
    puts: HashMap<QueryId, oneshot::Sender<Result<(), DhtError>>>,
    /// Where each get's values go as they are found; dropped when its query ends.
    gets: HashMap<QueryId, mpsc::UnboundedSender<Vec<u8>>>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<(), DhtError>>>>,
}

impl SwarmTask {
    async fn run(mut self, mut queue: mpsc::UnboundedReceiver<Command>) {
        loop {
            tokio::select! {
                command = queue.recv() => match command {
                    Some(command) => self.command(command),
                    None => return,
                },
                event = self.swarm.select_next_some() => self.event(event),
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::SetSeal(seal) => self.seal = Some(seal),
            Command::Dial(addr, reply) => {
                let Some(peer) = peer_of(&addr) else {
                    let _ =
                        reply.send(Err(DhtError::Dial { addr: addr.to_string(), reason: "no /p2p/<peer id>".into() }));
                    return;
                };
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                self.swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
                match self.swarm.dial(addr.clone()) {
                    Ok(()) => self.dials.entry(peer).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(DhtError::Dial { addr: addr.to_string(), reason: e.to_string() }));
                    }
                }
            }
            Command::Put(key, value, reply) => {
                let record = Record::new(key, value);
                match self.swarm.behaviour_mut().kad.put_record(record, Quorum::One) {
                    Ok(id) => {
                        self.puts.insert(id, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(DhtError::Put(e.to_string())));
                    }
                }
            }
            Command::Get(key, reply) => {
                let id = self.swarm.behaviour_mut().kad.get_record(kad::RecordKey::new(&key));
                self.gets.insert(id, reply);
            }
        }
    }

    fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut shared = lock(&self.shared);
                if !shared.listen_addrs.contains(&address) {
                    shared.listen_addrs.push(address);
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                if let Some(waiting) = self.dials.remove(&peer_id) {
                    for reply in waiting {
                        let _ = reply.send(Ok(()));
                    }
                    // A new seed: fill the routing table from it.
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id: Some(peer_id), error, .. } => {
                if let Some(waiting) = self.dials.remove(&peer_id) {
                    for reply in waiting {
                        let _ =
                            reply.send(Err(DhtError::Dial { addr: peer_id.to_string(), reason: error.to_string() }));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }))
                if info.protocol_version == IDENTIFY_PROTOCOL =>
            {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(event)) => self.kad_event(event),
            _ => {}
        }
    }

    fn kad_event(&mut self, event: kad::Event) {
        match event {
            kad::Event::RoutingUpdated { .. } | kad::Event::UnroutablePeer { .. } => self.publish_peers(),
            kad::Event::InboundRequest { request: InboundRequest::PutRecord { source, record: Some(record), .. } } => {
                self.inbound_put(source, record);
            }
            kad::Event::OutboundQueryProgressed { id, result, step, .. } => match result {
                QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) => {
                    if let Some(found_values) = self.gets.get(&id) {
                        let _ = found_values.send(found.record.value);
                    }
                    if step.last {
                        self.gets.remove(&id);
                    }
                }
                QueryResult::GetRecord(_) => {
                    self.gets.remove(&id);
                }
                QueryResult::PutRecord(result) => {
                    if let Some(reply) = self.puts.remove(&id) {
                        // Stored locally in any case; a lone node has no peer to hold a copy.
                        if let Err(e) = result {
                            tracing::debug!(error = %e, "record stored locally only");
                        }
                        let _ = reply.send(Ok(()));
                    }
                }
                QueryResult::Bootstrap(_) => self.publish_peers(),
                _ => {}
            },
            _ => {}
        }
    }

    /// Store a peer's record if it opens with the cluster's seal and is not older than ours.
    fn inbound_put(&mut self, source: PeerId, record: Record) {
        let Some(seal) = &self.seal else { return };
        let store = self.swarm.behaviour_mut().kad.store_mut();
        let held = store.get(&record.key).map(|r| r.value.clone());
        match seal.accept(record.key.as_ref(), &record.value, held.as_deref()) {
            Ok(_) => {
                if let Err(e) = store.put(record) {
                    tracing::warn!(%source, error = %e, "record not stored");
                }
            }
            Err(e) => tracing::info!(%source, error = %e, "refused a DHT record"),
        }
    }

    fn publish_peers(&mut self) {
        let mut peers: BTreeMap<String, DhtPeer> = BTreeMap::new();
        for bucket in self.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let peer_id = entry.node.key.preimage().to_string();
                let addrs = entry.node.value.iter().map(|a| a.to_string()).collect();
                peers.insert(peer_id.clone(), DhtPeer { peer_id, addrs });
            }
        }
        lock(&self.shared).peers = peers.into_values().collect();
    }
}

/// The peer id at the end of a multiaddr.
pub fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().find_map(|protocol| match protocol {
        libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{Entry, RecordKey, ShardEpoch, ShardRecord};
    use palaver_ids::{NodeId, ShardId};

    async fn node(seal: &RecordSeal) -> Dht {
        Dht::start(DhtConfig {
            keypair: Keypair::generate_ed25519(),
            listen: "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"),
            seal: Some(seal.clone()),
            agent: "palaver-test".into(),
        })
        .await
        .expect("starts")
    }

    fn shard_record(term: u64, leader: u64) -> Entry {
        Entry::Shard(ShardRecord {
            cluster_id: "c".into(),
            shard: ShardId(3),
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            leader: Some(NodeId(leader)),
            epoch: ShardEpoch { term, config_index: 1 },
        })
    }

    /// Wait until `check` holds, polling.
    async fn until<F: FnMut() -> bool>(what: &str, mut check: F) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("timed out waiting for {what}");
    }

    async fn newest(dht: &Dht, seal: &RecordSeal, key: &RecordKey) -> Option<Entry> {
        let values = dht.get(key.to_bytes()).await.expect("get");
        let mut best: Option<Entry> = None;
        for value in values {
            if let Ok((_, entry)) = seal.open(&key.to_bytes(), &value)
                && best.as_ref().is_none_or(|b| entry.newer_or_equal(b))
            {
                best = Some(entry);
            }
        }
        best
    }

    #[tokio::test]
    async fn records_spread_over_real_swarms_and_forgeries_do_not_stick() {
        let seal = RecordSeal::new(b"cluster");
        let a = node(&seal).await;
        let b = node(&seal).await;
        let c = node(&seal).await;
        // b knows a, c knows b only: c finds a through the DHT.
        b.dial(a.listen_addrs()[0].clone()).await.expect("b dials a");
        c.dial(b.listen_addrs()[0].clone()).await.expect("c dials b");
        until("c to learn of a", || c.peers().iter().any(|p| p.peer_id == a.peer_id().to_string())).await;

        let key = RecordKey::Shard(ShardId(3));
        a.put(key.to_bytes(), seal.seal(&key, &shard_record(5, 1))).await.expect("put");
        assert_eq!(newest(&c, &seal, &key).await, Some(shard_record(5, 1)));

        // A forger (another secret) and a stale publisher (older epoch) put over it.
        let forger = RecordSeal::new(b"not the cluster");
        c.put(key.to_bytes(), forger.seal(&key, &shard_record(9, 3))).await.expect("put");
        b.put(key.to_bytes(), seal.seal(&key, &shard_record(4, 2))).await.expect("put");
        // a (which holds the real record and got both puts) still answers with it.
        assert_eq!(newest(&a, &seal, &key).await, Some(shard_record(5, 1)));
        // A newer epoch does replace it everywhere a get looks.
        b.put(key.to_bytes(), seal.seal(&key, &shard_record(6, 2))).await.expect("put");
        assert_eq!(newest(&c, &seal, &key).await, Some(shard_record(6, 2)));
    }
}
