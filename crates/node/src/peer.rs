//! Links to other nodes: one gRPC channel per peer address, shared by every shard, and on it
//! one long-lived `PeerService.Link` stream that carries the node-to-node calls of every shard.
//!
//! openraft issues one RPC per shard and per follower (appends, heartbeats, votes); routing
//! forwards commands and reads; replication pushes CRDT deltas. Sent as unary gRPC calls, each
//! would pay for an HTTP/2 request of its own (DESIGN: budget). Instead each link has a queue: a
//! sender task takes whatever is queued (up to [`LINK_CALLS_PER_FRAME_MAX`]), tags each call
//! with an id, and writes them as one frame on the link's stream. The peer runs every call
//! concurrently and streams the answers back as they finish, batched the same way, so a slow
//! call (a forwarded command waiting for its commit) never holds up a heartbeat behind it.
//!
//! A stream that breaks (the peer died, the connection was reset, keepalive found it dead)
//! fails every call waiting on it as unreachable; the next call opens a new one. At most
//! [`LINK_CALLS_IN_FLIGHT_MAX`] calls wait for answers on one link; past that, callers queue.
//! Full snapshots still travel as their own unary call (`InstallSnapshot`): they are large
//! and rare, and must not delay the small calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_proto::v1::peer_service_client::PeerServiceClient;
use palaver_proto::v1::{
    Beat, BeatReply, CrdtBatchRequest, CrdtReply, CrdtRequest, ForwardReply, ForwardRequest, LinkAnswer, LinkCall,
    LinkCalls, RaftMessage, ReadReply, ReadRequest, link_answer, link_call, raft_reply,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tonic::transport::Channel;

use crate::env::{Dialer, PEER_REQUEST_TIMEOUT_MS};
use crate::limits::PEER_MESSAGE_BYTES_MAX;

/// Most calls written in one frame.
pub const LINK_CALLS_PER_FRAME_MAX: usize = 256;
/// Most calls waiting for an answer on one link.
pub const LINK_CALLS_IN_FLIGHT_MAX: usize = 4096;
/// Calls queued for one link before callers wait.
pub const LINK_QUEUE_CAPACITY: usize = 4096;
/// Frames queued for the stream's writer before the sender task waits.
pub const LINK_FRAMES_QUEUED_MAX: usize = 64;

const _: () = assert!(LINK_CALLS_PER_FRAME_MAX <= LINK_CALLS_IN_FLIGHT_MAX);

/// Why a peer call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// The peer could not be reached (connection refused, reset, timeout).
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
        /// Its gRPC status code.
        code: tonic::Code,
        /// Its error.
        reason: String,
    },
}

impl PeerError {
    /// The error as a gRPC status: unreachable peers are `Unavailable`.
    pub fn into_status(self) -> tonic::Status {
        match self {
            PeerError::Unreachable { addr, reason } => {
                tonic::Status::unavailable(format!("peer {addr} unreachable: {reason}"))
            }
            PeerError::Remote { code, reason, .. } => tonic::Status::new(code, reason),
        }
    }
}

type Answer = Result<link_answer::Body, PeerError>;

struct Pending {
    call: link_call::Body,
    reply: oneshot::Sender<Answer>,
}

/// One peer: its gRPC client and the queue of its link.
#[derive(Clone)]
pub struct PeerLink {
    addr: String,
    client: PeerServiceClient<Channel>,
    queue: mpsc::Sender<Pending>,
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
        let (queue, pending) = mpsc::channel(LINK_QUEUE_CAPACITY);
        tokio::spawn(run_link(addr.to_owned(), client.clone(), from, pending));
        Ok(Self { addr: addr.to_owned(), client, queue })
    }

    /// The peer's gRPC client, for the calls that do not go over the link.
    pub fn client(&self) -> PeerServiceClient<Channel> {
        self.client.clone()
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn unreachable(&self, reason: &str) -> PeerError {
        PeerError::Unreachable { addr: self.addr.clone(), reason: reason.to_owned() }
    }

    fn unexpected(&self) -> PeerError {
        PeerError::Remote { addr: self.addr.clone(), code: tonic::Code::Internal, reason: "unexpected answer".into() }
    }

    /// Send `call` on the link and wait for its answer, at most [`PEER_REQUEST_TIMEOUT_MS`].
    async fn call(&self, call: link_call::Body) -> Answer {
        let (reply, answer) = oneshot::channel();
        self.queue.send(Pending { call, reply }).await.map_err(|_| self.unreachable("link closed"))?;
        match tokio::time::timeout(Duration::from_millis(PEER_REQUEST_TIMEOUT_MS), answer).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(self.unreachable("link closed")),
            Err(_) => Err(self.unreachable("timed out")),
        }
    }

    /// Send one Raft message and wait for its reply payload.
    pub async fn raft(&self, message: RaftMessage) -> Result<Vec<u8>, PeerError> {
        match self.call(link_call::Body::Raft(message)).await? {
            link_answer::Body::Raft(reply) => match reply.result {
                Some(raft_reply::Result::Payload(bytes)) => Ok(bytes),
                Some(raft_reply::Result::Error(reason)) => {
                    Err(PeerError::Remote { addr: self.addr.clone(), code: tonic::Code::Internal, reason })
                }
                None => Err(self.unexpected()),
            },
            _ => Err(self.unexpected()),
        }
    }

    /// Submit a command to the peer, for the shard it (maybe) leads.
    pub async fn forward(&self, request: ForwardRequest) -> Result<ForwardReply, PeerError> {
        match self.call(link_call::Body::Forward(request)).await? {
            link_answer::Body::Forward(reply) => Ok(reply),
            _ => Err(self.unexpected()),
        }
    }

    /// Read a shard's state on the peer, if it leads it.
    pub async fn read(&self, request: ReadRequest) -> Result<ReadReply, PeerError> {
        match self.call(link_call::Body::Read(request)).await? {
            link_answer::Body::Read(reply) => Ok(reply),
            _ => Err(self.unexpected()),
        }
    }

    /// Run a framed client operation ([`crate::remote::ClientCall`]) on the peer.
    pub async fn client_op(&self, frame: Vec<u8>) -> Result<Vec<u8>, PeerError> {
        match self.call(link_call::Body::Client(frame)).await? {
            link_answer::Body::Client(bytes) => Ok(bytes),
            _ => Err(self.unexpected()),
        }
    }

    /// CRDT pushes for the peer's replicas of several shards.
    pub async fn crdt_batch(&self, request: CrdtBatchRequest) -> Result<CrdtReply, PeerError> {
        match self.call(link_call::Body::CrdtBatch(request)).await? {
            link_answer::Body::Crdt(reply) => Ok(reply),
            _ => Err(self.unexpected()),
        }
    }

    /// This node's beat for the idle groups it leads with replicas on the peer.
    pub async fn beat(&self, beat: Beat) -> Result<BeatReply, PeerError> {
        match self.call(link_call::Body::Beat(beat)).await? {
            link_answer::Body::Beat(reply) => Ok(reply),
            _ => Err(self.unexpected()),
        }
    }

    /// A CRDT replication message for the peer's replica of a shard.
    pub async fn crdt(&self, request: CrdtRequest) -> Result<CrdtReply, PeerError> {
        match self.call(link_call::Body::Crdt(request)).await? {
            link_answer::Body::Crdt(reply) => Ok(reply),
            _ => Err(self.unexpected()),
        }
    }
}

/// A caller waiting for its answer, and its share of the link's in-flight limit.
type Waiter = (oneshot::Sender<Answer>, Option<OwnedSemaphorePermit>);

/// Callers waiting for answers on one stream, by call id.
struct Waiting {
    /// `None` once the stream ended: nothing may wait on it any more.
    calls: Option<HashMap<u64, Waiter>>,
}

/// One open `Link` stream.
struct Session {
    frames: mpsc::Sender<LinkCalls>,
    waiting: Arc<Mutex<Waiting>>,
    /// Turns true when the answer stream ended.
    ended: watch::Receiver<bool>,
}

impl Session {
    async fn open(addr: &str, client: &PeerServiceClient<Channel>) -> Result<Self, PeerError> {
        let (frames, outgoing) = mpsc::channel(LINK_FRAMES_QUEUED_MAX);
        let mut client = client.clone();
        let response = client
            .link(tokio_stream::wrappers::ReceiverStream::new(outgoing))
            .await
            .map_err(|status| PeerError::Unreachable { addr: addr.to_owned(), reason: status.message().to_owned() })?;
        let mut answers = response.into_inner();
        let waiting = Arc::new(Mutex::new(Waiting { calls: Some(HashMap::new()) }));
        let reader = waiting.clone();
        let addr = addr.to_owned();
        let (end, ended) = watch::channel(false);
        tokio::spawn(async move {
            let reason = loop {
                match answers.message().await {
                    Ok(Some(frame)) => deliver(&reader, frame.answers, &addr),
                    Ok(None) => break "link closed by the peer".to_owned(),
                    Err(status) => break status.message().to_owned(),
                }
            };
            fail_all(&reader, &addr, &reason);
            let _ = end.send(true);
        });
        Ok(Self { frames, waiting, ended })
    }

    /// Whether the session is done: its waiting calls were failed (the reader does that first
    /// when the stream ends, and so does a stalled send).
    fn is_closed(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).calls.is_none()
    }

    /// Queue `frame` for the stream. `false` if the stream ended, or could not take the frame
    /// within [`PEER_REQUEST_TIMEOUT_MS`] (a connection that stalled without breaking): either
    /// way the session is done.
    async fn send(&self, frame: LinkCalls) -> bool {
        let mut ended = self.ended.clone();
        tokio::select! {
            sent = tokio::time::timeout(Duration::from_millis(PEER_REQUEST_TIMEOUT_MS), self.frames.send(frame)) => {
                matches!(sent, Ok(Ok(())))
            }
            _ = ended.wait_for(|ended| *ended) => false,
        }
    }
}

/// Fail every call waiting on a session, and let no more wait on it.
fn fail_all(waiting: &Mutex<Waiting>, addr: &str, reason: &str) {
    let calls = waiting.lock().unwrap_or_else(|p| p.into_inner()).calls.take();
    for (_, (reply, _permit)) in calls.into_iter().flatten() {
        let _ = reply.send(Err(PeerError::Unreachable { addr: addr.to_owned(), reason: reason.to_owned() }));
    }
}

/// Hand each answer to the caller waiting for it (callers that gave up are skipped).
fn deliver(waiting: &Mutex<Waiting>, answers: Vec<LinkAnswer>, addr: &str) {
    let mut waiting = waiting.lock().unwrap_or_else(|p| p.into_inner());
    let Some(calls) = waiting.calls.as_mut() else { return };
    for answer in answers {
        let Some((reply, _permit)) = calls.remove(&answer.id) else { continue };
        let outcome = match answer.body {
            Some(link_answer::Body::Error(error)) => Err(PeerError::Remote {
                addr: addr.to_owned(),
                code: tonic::Code::from_i32(error.code),
                reason: error.message,
            }),
            Some(body) => Ok(body),
            None => Err(PeerError::Remote {
                addr: addr.to_owned(),
                code: tonic::Code::Internal,
                reason: "empty answer".into(),
            }),
        };
        let _ = reply.send(outcome);
    }
}

/// The next batch from `queue`: waits for one item, then takes whatever else is already
/// queued, up to `max`. When the queue runs dry, the task yields once and takes what the
/// tasks that ran meanwhile queued: a wake-up of many shards (a group commit completing the
/// appends of many groups) then leaves as one frame and one write system call instead of one
/// per shard (64 clients' consensus writes: ~6,800 -> ~7,600/s, medians of 7 interleaved
/// runs; two or four yields did worse than one). `None` once every sender is gone.
pub(crate) async fn next_batch<T>(queue: &mut mpsc::Receiver<T>, max: usize) -> Option<Vec<T>> {
    let mut batch = vec![queue.recv().await?];
    let mut yielded = false;
    while batch.len() < max {
        match queue.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) if !yielded => {
                yielded = true;
                tokio::task::yield_now().await;
            }
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Drains the queue into frames on the link's stream until every sender is gone.
async fn run_link(addr: String, client: PeerServiceClient<Channel>, from: u64, mut queue: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(LINK_CALLS_IN_FLIGHT_MAX));
    let mut session: Option<Session> = None;
    let mut next_id = 0u64;
    while let Some(batch) = next_batch(&mut queue, LINK_CALLS_PER_FRAME_MAX).await {
        let Ok(mut permits) = in_flight.clone().acquire_many_owned(batch.len() as u32).await else { break };
        if session.as_ref().is_none_or(Session::is_closed) {
            session = match Session::open(&addr, &client).await {
                Ok(opened) => Some(opened),
                Err(error) => {
                    for pending in batch {
                        let _ = pending.reply.send(Err(error.clone()));
                    }
                    continue;
                }
            };
        }
        let Some(open) = session.as_ref() else { continue };
        let mut calls = Vec::with_capacity(batch.len());
        {
            let mut waiting = open.waiting.lock().unwrap_or_else(|p| p.into_inner());
            for pending in batch {
                let Some(waiters) = waiting.calls.as_mut() else {
                    let _ = pending
                        .reply
                        .send(Err(PeerError::Unreachable { addr: addr.clone(), reason: "link closed".into() }));
                    continue;
                };
                next_id += 1;
                let permit = permits.split(1);
                waiters.insert(next_id, (pending.reply, permit));
                calls.push(LinkCall { id: next_id, body: Some(pending.call) });
            }
        }
        if !calls.is_empty() && !open.send(LinkCalls { from, calls }).await {
            fail_all(&open.waiting, &addr, "link stalled or closed");
            session = None;
        }
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
    /// No links yet; `from` is this node's id, sent with every frame.
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

    /// Drop every link (their streams close once in-flight calls finish).
    pub fn close(&self) {
        self.links.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clear();
    }
}
