//! Links to other nodes: one gRPC channel per peer address, shared by every shard, with the
//! Raft RPCs of all shards to that peer coalesced into batches.
//!
//! openraft issues one RPC per shard and per follower (appends, heartbeats, votes). Sent one by
//! one, 64 shards' heartbeats to one peer would be 640 unary calls a second. Instead each link
//! has a queue: a sender task takes whatever is queued (up to [`RAFT_BATCH_MESSAGES_MAX`]),
//! sends it as one `PeerService.Raft` call, and hands each reply back to its caller. Up to
//! [`RAFT_BATCHES_IN_FLIGHT_MAX`] batches are in flight per peer, so a slow snapshot or a large
//! append does not stall heartbeats behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use palaver_proto::v1::peer_service_client::PeerServiceClient;
use palaver_proto::v1::{RaftBatch, RaftMessage, RaftReply, raft_reply};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::transport::Channel;

use crate::env::Dialer;
use crate::limits::PEER_MESSAGE_BYTES_MAX;

/// Most Raft messages in one batch.
pub const RAFT_BATCH_MESSAGES_MAX: usize = 256;
/// Most batches in flight to one peer.
pub const RAFT_BATCHES_IN_FLIGHT_MAX: usize = 8;
/// Raft messages queued for one peer before callers wait.
pub const RAFT_QUEUE_CAPACITY: usize = 4096;

const _: () = assert!(RAFT_BATCH_MESSAGES_MAX <= RAFT_QUEUE_CAPACITY);

struct Pending {
    message: RaftMessage,
    reply: oneshot::Sender<Result<Vec<u8>, PeerError>>,
}

/// Why a peer call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer could not be reached (connection refused, timeout, transport error).
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable {
        /// The peer's address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// The peer answered with an error.
    #[error("peer {addr} refused: {reason}")]
    Remote {
        /// The peer's address.
        addr: String,
        /// Its error.
        reason: String,
    },
}

/// One peer: its gRPC client and its Raft batch queue.
#[derive(Clone)]
pub struct PeerLink {
    addr: String,
    client: PeerServiceClient<Channel>,
    raft_queue: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for PeerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLink").field("addr", &self.addr).finish()
    }
}

impl PeerLink {
    fn open(addr: &str, dialer: &dyn Dialer, from: u64) -> Result<Self, PeerError> {
        let channel =
            dialer.channel(addr).map_err(|reason| PeerError::Unreachable { addr: addr.to_owned(), reason })?;
        let client = PeerServiceClient::new(channel)
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX);
        let (raft_queue, pending) = mpsc::channel(RAFT_QUEUE_CAPACITY);
        tokio::spawn(run_batcher(addr.to_owned(), client.clone(), from, pending));
        Ok(Self { addr: addr.to_owned(), client, raft_queue })
    }

    /// The peer's gRPC client, for calls other than Raft.
    pub fn client(&self) -> PeerServiceClient<Channel> {
        self.client.clone()
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Send one Raft message in the next batch and wait for its reply payload.
    pub async fn raft(&self, message: RaftMessage) -> Result<Vec<u8>, PeerError> {
        let (reply, answer) = oneshot::channel();
        let gone = || PeerError::Unreachable { addr: self.addr.clone(), reason: "link closed".into() };
        self.raft_queue.send(Pending { message, reply }).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// Drains the queue into batches until every sender is gone.
async fn run_batcher(
    addr: String,
    client: PeerServiceClient<Channel>,
    from: u64,
    mut pending: mpsc::Receiver<Pending>,
) {
    let in_flight = Arc::new(Semaphore::new(RAFT_BATCHES_IN_FLIGHT_MAX));
    while let Some(first) = pending.recv().await {
        let mut batch = vec![first];
        while batch.len() < RAFT_BATCH_MESSAGES_MAX {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let mut client = client.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (messages, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.message, p.reply)).unzip();
            let result = client.raft(RaftBatch { from, messages }).await;
            match result {
                Ok(response) => {
                    let answers = response.into_inner().replies;
                    let mut answers = answers.into_iter();
                    for reply in replies {
                        let outcome = match answers.next() {
                            Some(RaftReply { result: Some(raft_reply::Result::Payload(bytes)) }) => Ok(bytes),
                            Some(RaftReply { result: Some(raft_reply::Result::Error(reason)) }) => {
                                Err(PeerError::Remote { addr: addr.clone(), reason })
                            }
                            Some(RaftReply { result: None }) | None => {
                                Err(PeerError::Remote { addr: addr.clone(), reason: "missing reply".into() })
                            }
                        };
                        let _ = reply.send(outcome);
                    }
                }
                Err(status) => {
                    let error = PeerError::Unreachable { addr: addr.clone(), reason: status.message().to_owned() };
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}

/// Every peer link of a node, by address, opened on first use.
#[derive(Debug)]
pub struct Peers {
    from: u64,
    dialer: Arc<dyn Dialer>,
    links: Mutex<BTreeMap<String, PeerLink>>,
}

impl Peers {
    /// No links yet; `from` is this node's id, sent with every batch.
    pub fn new(from: u64, dialer: Arc<dyn Dialer>) -> Self {
        Self { from, dialer, links: Mutex::new(BTreeMap::new()) }
    }

    /// The link to `addr`, opened if needed.
    pub fn link(&self, addr: &str) -> Result<PeerLink, PeerError> {
        let mut links = self.links.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(link) = links.get(addr) {
            return Ok(link.clone());
        }
        let link = PeerLink::open(addr, self.dialer.as_ref(), self.from)?;
        links.insert(addr.to_owned(), link.clone());
        Ok(link)
    }

    /// Drop every link (their batchers stop once in-flight calls finish).
    pub fn close(&self) {
        self.links.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }
}
