//! The records the DHT carries, and how a node tells a real one from a forged, malformed or
//! stale one.
//!
//! Two kinds of entry live in Kademlia:
//!
//! - [`NodeRecord`]: who a node is and where to reach it (node id, libp2p peer id, gRPC, HTTP
//!   and libp2p addresses). Stored under the node's id and, as an alias, under its peer id, so
//!   that a node given only a multiaddr can find the gRPC address behind it.
//! - [`ShardRecord`]: a shard's directory entry — its replicas, the leader that published it and
//!   the configuration epoch ([`ShardEpoch`]: the leader's term, then the log index of the
//!   membership it had), published by the shard's leader on every leader or membership change.
//!
//! Every value is **sealed**: an HMAC-SHA256 over the key and the encoded entry, keyed by a key
//! derived from the cluster secret that every node receives when it joins. A node accepts a
//! value only if the seal is right, the entry belongs under the key it was stored under, and it
//! is not older than what the node already holds for that key ([`Entry::newer_or_equal`]).
//! Kademlia is discovery and hints, never authority: an accepted record can still be stale, and
//! routing corrects it from the answers it gets (see the node's routing layer).

use std::fmt;

use hmac::{Hmac, Mac};
use palaver_ids::{NodeId, ShardId};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Every record key starts with this.
pub const RECORD_KEY_PREFIX: &str = "/palaver/v1/";
/// Largest sealed value accepted from the network.
pub const RECORD_VALUE_BYTES_MAX: usize = 16 * 1024;
/// Context string of the key derivation: the seal key is not the token key itself.
const SEAL_CONTEXT: &[u8] = b"palaver dht record seal v1";
/// Bytes of an HMAC-SHA256 tag.
const MAC_BYTES: usize = 32;

/// Where a node is reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The cluster it belongs to.
    pub cluster_id: String,
    /// Its node id.
    pub node: NodeId,
    /// Its libp2p peer id (base58).
    pub peer_id: String,
    /// Its gRPC address (`host:port`).
    pub grpc_addr: String,
    /// Its HTTP address, if it serves one.
    pub http_addr: Option<String>,
    /// Its libp2p listen addresses.
    pub p2p_addrs: Vec<String>,
    /// Bumped on every start of the node: a record of an earlier start never wins.
    pub epoch: u64,
}

/// The configuration epoch of a shard: ordered by the leader's term, then by the log index of
/// the membership that leader had. Every new leader has a larger term; within one term, only
/// its leader publishes, and its membership index only grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct ShardEpoch {
    /// The publishing leader's term.
    pub term: u64,
    /// The log index of the membership configuration it published.
    pub config_index: u64,
}

impl fmt::Display for ShardEpoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.term, self.config_index)
    }
}

/// A shard's directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRecord {
    /// The cluster it belongs to.
    pub cluster_id: String,
    /// The shard.
    pub shard: ShardId,
    /// Its voters.
    pub replicas: Vec<NodeId>,
    /// The leader that published it.
    pub leader: Option<NodeId>,
    /// When it was true.
    pub epoch: ShardEpoch,
}

/// What a record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Entry {
    /// A node.
    Node(NodeRecord),
    /// A shard.
    Shard(ShardRecord),
}

impl Entry {
    /// Whether this entry may stand in for `other`, the entry held so far under the same key.
    pub fn newer_or_equal(&self, other: &Entry) -> bool {
        match (self, other) {
            (Entry::Node(new), Entry::Node(old)) => new.epoch >= old.epoch,
            (Entry::Shard(new), Entry::Shard(old)) => new.epoch >= old.epoch,
            _ => false,
        }
    }

    /// The cluster the entry belongs to.
    pub fn cluster_id(&self) -> &str {
        match self {
            Entry::Node(node) => &node.cluster_id,
            Entry::Shard(shard) => &shard.cluster_id,
        }
    }

    /// Whether the entry may be stored under `key`.
    fn belongs_under(&self, key: &RecordKey) -> bool {
        match (self, key) {
            (Entry::Node(node), RecordKey::Node(id)) => node.node == *id,
            (Entry::Node(node), RecordKey::Peer(peer)) => node.peer_id == *peer,
            (Entry::Shard(shard), RecordKey::Shard(id)) => shard.shard == *id,
            _ => false,
        }
    }
}

/// The key a record is stored under.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    /// A node, by id.
    Node(NodeId),
    /// A node, by libp2p peer id.
    Peer(String),
    /// A shard's directory entry.
    Shard(ShardId),
}

impl RecordKey {
    /// The key's bytes in the DHT.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }

    /// Parse a key from the DHT.
    pub fn parse(bytes: &[u8]) -> Result<Self, RecordError> {
        let text = std::str::from_utf8(bytes).map_err(|_| RecordError::Malformed("key is not UTF-8".into()))?;
        let rest = text
            .strip_prefix(RECORD_KEY_PREFIX)
            .ok_or_else(|| RecordError::Malformed(format!("key {text:?} outside {RECORD_KEY_PREFIX}")))?;
        let (kind, id) = rest.split_once('/').ok_or_else(|| RecordError::Malformed(format!("key {text:?}")))?;
        let number = || id.parse::<u64>().map_err(|_| RecordError::Malformed(format!("key {text:?}: bad id")));
        match kind {
            "node" => Ok(RecordKey::Node(NodeId(number()?))),
            "shard" => {
                let shard = u32::try_from(number()?).map_err(|_| RecordError::Malformed(format!("key {text:?}")))?;
                Ok(RecordKey::Shard(ShardId(shard)))
            }
            "peer" if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Ok(RecordKey::Peer(id.to_owned()))
            }
            _ => Err(RecordError::Malformed(format!("key {text:?}: unknown kind"))),
        }
    }
}

impl fmt::Display for RecordKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordKey::Node(id) => write!(f, "{RECORD_KEY_PREFIX}node/{id}"),
            RecordKey::Peer(peer) => write!(f, "{RECORD_KEY_PREFIX}peer/{peer}"),
            RecordKey::Shard(id) => write!(f, "{RECORD_KEY_PREFIX}shard/{id}"),
        }
    }
}

/// Why a record was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not a palaver record: bad key, bad encoding, too large.
    #[error("malformed record: {0}")]
    Malformed(String),
    /// The seal does not match: forged, or from another cluster.
    #[error("record seal does not verify")]
    Forged,
    /// The entry does not belong under its key (a valid record replayed elsewhere).
    #[error("record entry does not belong under key {0}")]
    Misplaced(String),
    /// Older than the record already held for the key.
    #[error("record older than the one held for {0}")]
    Stale(String),
}

/// The sealed form of a value in the DHT.
#[derive(Debug, Serialize, Deserialize)]
struct Sealed {
    entry: Vec<u8>,
    mac: Vec<u8>,
}

/// Seals and opens records with the cluster's key.
#[derive(Clone)]
pub struct RecordSeal {
    key: [u8; MAC_BYTES],
}

impl fmt::Debug for RecordSeal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RecordSeal(..)")
    }
}

impl RecordSeal {
    /// The seal of the cluster whose secret is `cluster_secret`.
    pub fn new(cluster_secret: &[u8]) -> Self {
        let mut mac = Self::mac_with(cluster_secret);
        mac.update(SEAL_CONTEXT);
        let mut key = [0u8; MAC_BYTES];
        key.copy_from_slice(&mac.finalize().into_bytes());
        Self { key }
    }

    fn mac_with(key: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    fn tag(&self, key: &RecordKey, entry: &[u8]) -> Hmac<Sha256> {
        let mut mac = Self::mac_with(&self.key);
        let key = key.to_bytes();
        mac.update(&(key.len() as u64).to_be_bytes());
        mac.update(&key);
        mac.update(entry);
        mac
    }

    /// The value to store `entry` under `key`.
    pub fn seal(&self, key: &RecordKey, entry: &Entry) -> Vec<u8> {
        let entry = postcard::to_stdvec(entry).unwrap_or_default();
        let mac = self.tag(key, &entry).finalize().into_bytes().to_vec();
        postcard::to_stdvec(&Sealed { entry, mac }).unwrap_or_default()
    }

    /// Check and decode a value found under `key`.
    pub fn open(&self, key: &[u8], value: &[u8]) -> Result<(RecordKey, Entry), RecordError> {
        let (key, sealed) = unsealed_parts(key, value)?;
        self.tag(&key, &sealed.entry).verify_slice(&sealed.mac).map_err(|_| RecordError::Forged)?;
        let entry = decode_entry(&key, &sealed.entry)?;
        Ok((key, entry))
    }

    /// [`RecordSeal::open`], then refuse the record if `held` (the value already stored under
    /// the key, if any and if it opens) is newer.
    pub fn accept(&self, key: &[u8], value: &[u8], held: Option<&[u8]>) -> Result<(RecordKey, Entry), RecordError> {
        let (parsed, entry) = self.open(key, value)?;
        if let Some(held) = held
            && let Ok((_, old)) = self.open(key, held)
            && !entry.newer_or_equal(&old)
        {
            return Err(RecordError::Stale(parsed.to_string()));
        }
        Ok((parsed, entry))
    }
}

/// Decode a value without checking its seal: only for a node that has not joined yet and so
/// has no key, reading the node record behind a multiaddr it was explicitly given.
pub fn open_unverified(key: &[u8], value: &[u8]) -> Result<(RecordKey, Entry), RecordError> {
    let (key, sealed) = unsealed_parts(key, value)?;
    let entry = decode_entry(&key, &sealed.entry)?;
    Ok((key, entry))
}

fn unsealed_parts(key: &[u8], value: &[u8]) -> Result<(RecordKey, Sealed), RecordError> {
    if value.len() > RECORD_VALUE_BYTES_MAX {
        return Err(RecordError::Malformed(format!("value of {} bytes", value.len())));
    }
    let key = RecordKey::parse(key)?;
    let sealed: Sealed = postcard::from_bytes(value).map_err(|e| RecordError::Malformed(e.to_string()))?;
    Ok((key, sealed))
}

fn decode_entry(key: &RecordKey, bytes: &[u8]) -> Result<Entry, RecordError> {
    let entry: Entry = postcard::from_bytes(bytes).map_err(|e| RecordError::Malformed(e.to_string()))?;
    if !entry.belongs_under(key) {
        return Err(RecordError::Misplaced(key.to_string()));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(term: u64, config_index: u64, leader: u64) -> Entry {
        Entry::Shard(ShardRecord {
            cluster_id: "c".into(),
            shard: ShardId(7),
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            leader: Some(NodeId(leader)),
            epoch: ShardEpoch { term, config_index },
        })
    }

    fn node(id: u64, epoch: u64) -> Entry {
        Entry::Node(NodeRecord {
            cluster_id: "c".into(),
            node: NodeId(id),
            peer_id: "12D3KooWabc".into(),
            grpc_addr: "127.0.0.1:7101".into(),
            http_addr: None,
            p2p_addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            epoch,
        })
    }

    #[test]
    fn keys_print_and_parse_back() {
        for key in [RecordKey::Node(NodeId(3)), RecordKey::Shard(ShardId(0)), RecordKey::Peer("12D3KooWabc".into())] {
            assert_eq!(RecordKey::parse(&key.to_bytes()).expect("parses"), key);
        }
        for bad in ["/palaver/v1/node/x", "/other/node/1", "/palaver/v1/room/1", "/palaver/v1/peer/a b", "/palaver/v1/"]
        {
            assert!(RecordKey::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(RecordKey::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn a_sealed_record_opens_with_the_same_secret_only() {
        let seal = RecordSeal::new(b"cluster secret");
        let key = RecordKey::Shard(ShardId(7));
        let value = seal.seal(&key, &shard(3, 10, 2));
        assert_eq!(seal.open(&key.to_bytes(), &value).expect("opens").1, shard(3, 10, 2));
        let other = RecordSeal::new(b"another cluster");
        assert_eq!(other.open(&key.to_bytes(), &value), Err(RecordError::Forged));
    }

    #[test]
    fn tampered_misplaced_and_malformed_records_are_refused() {
        let seal = RecordSeal::new(b"s");
        let key = RecordKey::Shard(ShardId(7));
        let mut value = seal.seal(&key, &shard(3, 10, 2));
        // A flipped byte inside the entry (a changed leader) breaks the seal.
        let at = value.len() / 2;
        value[at] ^= 1;
        assert!(matches!(seal.open(&key.to_bytes(), &value), Err(RecordError::Forged | RecordError::Malformed(_))));
        // A valid record for shard 7 stored under shard 8's key.
        let value = seal.seal(&key, &shard(3, 10, 2));
        assert!(seal.open(&RecordKey::Shard(ShardId(8)).to_bytes(), &value).is_err());
        // Sealed for the wrong key by an insider: it verifies but does not belong there.
        let misplaced = seal.seal(&RecordKey::Shard(ShardId(8)), &shard(3, 10, 2));
        assert_eq!(
            seal.open(&RecordKey::Shard(ShardId(8)).to_bytes(), &misplaced),
            Err(RecordError::Misplaced("/palaver/v1/shard/8".into()))
        );
        // Garbage, empty and oversize values.
        for bad in [vec![], vec![1, 2, 3], vec![0; RECORD_VALUE_BYTES_MAX + 1]] {
            assert!(matches!(seal.open(&key.to_bytes(), &bad), Err(RecordError::Malformed(_))));
        }
    }

    #[test]
    fn an_older_epoch_never_replaces_a_newer_one() {
        let seal = RecordSeal::new(b"s");
        let key = RecordKey::Shard(ShardId(7));
        let held = seal.seal(&key, &shard(5, 10, 2));
        for (term, index, accepted) in [(4, 99, false), (5, 9, false), (5, 10, true), (5, 11, true), (6, 1, true)] {
            let offered = seal.seal(&key, &shard(term, index, 3));
            assert_eq!(seal.accept(&key.to_bytes(), &offered, Some(&held)).is_ok(), accepted, "{term}.{index}");
        }
        let node_key = RecordKey::Node(NodeId(4));
        let held = seal.seal(&node_key, &node(4, 7));
        assert!(seal.accept(&node_key.to_bytes(), &seal.seal(&node_key, &node(4, 6)), Some(&held)).is_err());
        assert!(seal.accept(&node_key.to_bytes(), &seal.seal(&node_key, &node(4, 8)), Some(&held)).is_ok());
        // A held value that does not open does not protect anything.
        assert!(seal.accept(&key.to_bytes(), &seal.seal(&key, &shard(1, 1, 1)), Some(b"junk")).is_ok());
    }

    #[test]
    fn a_node_record_lives_under_its_id_and_its_peer_id() {
        let seal = RecordSeal::new(b"s");
        let entry = node(4, 1);
        for key in [RecordKey::Node(NodeId(4)), RecordKey::Peer("12D3KooWabc".into())] {
            let value = seal.seal(&key, &entry);
            assert_eq!(seal.open(&key.to_bytes(), &value).expect("opens").1, entry);
            assert_eq!(open_unverified(&key.to_bytes(), &value).expect("decodes").1, entry);
        }
        let wrong = RecordKey::Node(NodeId(5));
        assert!(seal.open(&wrong.to_bytes(), &seal.seal(&wrong, &entry)).is_err());
    }
}
