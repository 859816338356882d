//! The gRPC surfaces of a node: `ChatService` and `AdminService` for clients and operators,
//! `PeerService` for other nodes, and server reflection. Each handler is a thin adapter:
//! protobuf in, a call into [`crate::ops`] / [`crate::routing`] / the replicas, protobuf out;
//! errors become statuses in one place ([`ApiError`]'s `From` impl).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use palaver_ids::ShardId;
use palaver_proto::v1 as pb;
use palaver_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use palaver_proto::v1::chat_service_server::{ChatService, ChatServiceServer};
use palaver_proto::v1::peer_service_server::{PeerService, PeerServiceServer};
use palaver_shard::types::{Snapshot, SnapshotMeta, Vote};
use palaver_shard::{Command, Outcome, keys};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::{Request, Response, Status};

use crate::connections::{ClientConnection, ConnectionInfo};
use crate::convert;
use crate::dispatch;
use crate::error::ApiError;
use crate::limits::{CLIENT_MESSAGE_BYTES_MAX, PEER_MESSAGE_BYTES_MAX};
use crate::node::NodeInner;
use crate::ops::{Ops, TargetAction};
use crate::peer::{LINK_CALLS_IN_FLIGHT_MAX, LINK_CALLS_PER_FRAME_MAX, next_batch};
use crate::routing::{self, LocalError};

/// Most requests of one `Pipeline` stream running at once; past that the stream is not read.
pub const PIPELINE_IN_FLIGHT_MAX: usize = 1024;
/// How long a status call waits for each node.
pub const STATUS_NODE_TIMEOUT_MS: u64 = 2_000;

/// Serve every gRPC service on `listener` until `stopped` turns true.
pub async fn serve(
    node: Arc<NodeInner>,
    listener: TcpListener,
    per_address: crate::limits::PerAddress,
    mut stopped: watch::Receiver<bool>,
) {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(palaver_proto::FILE_DESCRIPTOR_SET)
        .build_v1();
    let reflection = match reflection {
        Ok(service) => service,
        Err(e) => {
            tracing::error!(error = %e, "reflection service failed to build");
            return;
        }
    };
    let chat = ChatServiceServer::new(ChatApi { ops: Ops::new(node.clone()), stopped: stopped.clone() })
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX);
    let admin = AdminServiceServer::new(AdminApi { node: node.clone() });
    let peer = PeerServiceServer::new(PeerApi { node: node.clone(), stopped: stopped.clone() })
        .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX);
    // Accepted sockets do not inherit the builder's `tcp_nodelay` when the listener is ours:
    // without it, Nagle holds back the small frames of streams until the peer's delayed ACK.
    // Each connection is counted against its client's address (`connections.rs`).
    let metrics = node.metrics.clone();
    let incoming =
        tokio_stream::StreamExt::map(tokio_stream::wrappers::TcpListenerStream::new(listener), move |socket| {
            socket.map(|s| {
                if let Err(e) = s.set_nodelay(true) {
                    tracing::warn!(error = %e, "could not set TCP_NODELAY");
                }
                let connection = ClientConnection::accept(s, &per_address);
                if connection.is_refused() {
                    metrics.connection_refused(crate::metrics::Surface::Grpc);
                }
                connection
            })
        });
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .layer(CountCalls { metrics: node.metrics.clone() })
        .add_service(chat)
        .add_service(admin)
        .add_service(peer)
        .add_service(reflection)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Counts `ChatService` calls in the node's metrics: by method and by the `palaver-error` code
/// of the answer (`ok` without one; `grpc_N` for a status of tonic's own, such as an
/// over-size message). Streams count when their response starts.
#[derive(Debug, Clone)]
struct CountCalls {
    metrics: crate::metrics::Metrics,
}

impl<S> tower::Layer<S> for CountCalls {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Counted { inner, metrics: self.metrics.clone() }
    }
}

/// A service whose `ChatService` calls are counted (see [`CountCalls`]).
#[derive(Debug, Clone)]
struct Counted<S> {
    inner: S,
    metrics: crate::metrics::Metrics,
}

/// The `ChatService` method a request path names, as a metrics label (snake case); `None` for
/// other services.
fn chat_method(path: &str) -> Option<&'static str> {
    let method = path.strip_prefix("/palaver.v1.ChatService/")?;
    dispatch::OPERATIONS.iter().find(|(name, _)| *name == method).map(|(_, label)| *label)
}

impl<S, B, R> tower::Service<tonic::codegen::http::Request<B>> for Counted<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = tonic::codegen::http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: tonic::codegen::http::Request<B>) -> Self::Future {
        let method = chat_method(request.uri().path());
        let metrics = self.metrics.clone();
        let started = std::time::Instant::now();
        // A connection past its address's limit gets the refusal on every call.
        let refused = request.extensions().get::<ConnectionInfo>().and_then(|info| info.refused.clone());
        if let Some(error) = refused {
            if let Some(method) = method {
                metrics.observe(crate::metrics::Surface::Grpc, method, error.code(), started);
            }
            return Box::pin(async move { Ok(Status::from(error).into_http()) });
        }
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await;
            if let (Some(method), Ok(response)) = (method, &response) {
                let headers = response.headers();
                let header = |key: &str| headers.get(key).and_then(|v| v.to_str().ok());
                let code = match (header(crate::error::ERROR_CODE_METADATA_KEY), header("grpc-status")) {
                    (Some(code), _) => code.to_owned(),
                    (None, None | Some("0")) => "ok".to_owned(),
                    (None, Some(status)) => format!("grpc_{status}"),
                };
                metrics.observe(crate::metrics::Surface::Grpc, method, &code, started);
            }
            response
        })
    }
}

fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
}

/// `palaver.v1.ChatService`.
#[derive(Debug)]
struct ChatApi {
    ops: Ops,
    /// Long-lived streams end when this turns true, so that shutdown does not wait on them.
    stopped: watch::Receiver<bool>,
}

impl ChatApi {
    fn user<T>(&self, request: &Request<T>) -> Result<palaver_ids::UserName, Status> {
        Ok(self.ops.authenticate(bearer(request))?)
    }

    /// The token of a stream whose requests each check it again (so that a token expiring
    /// mid-stream stops working); a stream without a valid one is refused at once.
    fn stream_token<T>(&self, request: &Request<T>) -> Result<String, Status> {
        self.user(request)?;
        Ok(bearer(request).unwrap_or_default().to_owned())
    }
}

#[tonic::async_trait]
impl ChatService for ChatApi {
    async fn register(&self, request: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        Ok(Response::new(dispatch::register(&self.ops, request.into_inner()).await?))
    }

    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        Ok(Response::new(dispatch::login(&self.ops, request.into_inner()).await?))
    }

    async fn create_room(&self, request: Request<pb::CreateRoomRequest>) -> Result<Response<pb::Room>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::create_room(&self.ops, &user, request.into_inner()).await?))
    }

    async fn get_room(&self, request: Request<pb::RoomRequest>) -> Result<Response<pb::Room>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::get_room(&self.ops, &user, request.into_inner()).await?))
    }

    async fn list_rooms(
        &self,
        request: Request<pb::ListRoomsRequest>,
    ) -> Result<Response<pb::ListRoomsResponse>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::list_rooms(&self.ops, &user).await?))
    }

    async fn delete_room(&self, request: Request<pb::RoomRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::delete_room(&self.ops, &user, request.into_inner()).await?))
    }

    async fn update_room(&self, request: Request<pb::UpdateRoomRequest>) -> Result<Response<pb::Room>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::update_room(&self.ops, &user, request.into_inner()).await?))
    }

    async fn join(&self, request: Request<pb::RoomRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::join(&self.ops, &user, request.into_inner()).await?))
    }

    async fn invite(&self, request: Request<pb::TargetRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::act_on(&self.ops, &user, TargetAction::Invite, request.into_inner()).await?))
    }

    async fn leave(&self, request: Request<pb::RoomRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::leave(&self.ops, &user, request.into_inner()).await?))
    }

    async fn kick(&self, request: Request<pb::TargetRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::act_on(&self.ops, &user, TargetAction::Kick, request.into_inner()).await?))
    }

    async fn ban(&self, request: Request<pb::BanRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::ban(&self.ops, &user, request.into_inner()).await?))
    }

    async fn unban(&self, request: Request<pb::TargetRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::act_on(&self.ops, &user, TargetAction::Unban, request.into_inner()).await?))
    }

    async fn set_role(&self, request: Request<pb::SetRoleRequest>) -> Result<Response<pb::Ack>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::set_role(&self.ops, &user, request.into_inner()).await?))
    }

    async fn post(&self, request: Request<pb::PostRequest>) -> Result<Response<pb::PostResponse>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::post(&self.ops, &user, request.into_inner()).await?))
    }

    async fn edit(&self, request: Request<pb::EditRequest>) -> Result<Response<pb::EventAck>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::edit(&self.ops, &user, request.into_inner()).await?))
    }

    async fn redact(&self, request: Request<pb::MessageRequest>) -> Result<Response<pb::EventAck>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::redact(&self.ops, &user, request.into_inner()).await?))
    }

    async fn react(&self, request: Request<pb::ReactRequest>) -> Result<Response<pb::EventAck>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::react(&self.ops, &user, request.into_inner()).await?))
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::history(&self.ops, &user, request.into_inner()).await?))
    }

    type SubscribeStream = crate::connections::Counted<crate::subscribe::EventStream>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let user = self.user(&request)?;
        // Counted on its connection while the stream lives.
        let slot = request.extensions().get::<ConnectionInfo>().map(ConnectionInfo::subscription).transpose()?;
        let stream = dispatch::subscribe(&self.ops, &user, request.into_inner()).await?;
        Ok(Response::new(crate::connections::Counted::new(stream, slot)))
    }

    async fn set_presence(
        &self,
        request: Request<pb::SetPresenceRequest>,
    ) -> Result<Response<pb::SetPresenceResponse>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::set_presence(&self.ops, &user, request.into_inner()).await?))
    }

    type PipelineStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::PipelineReply, Status>> + Send>>;

    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<pb::PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let token = self.stream_token(&request)?;
        let mut incoming = request.into_inner();
        let (replies, outgoing) = mpsc::channel::<Result<pb::PipelineReply, Status>>(PIPELINE_IN_FLIGHT_MAX);
        let ops = self.ops.clone();
        let mut stopping = self.stopped.clone();
        tokio::spawn(async move {
            // Requests run concurrently on this task (at most PIPELINE_IN_FLIGHT_MAX), not on
            // a task spawned and woken for each.
            let mut running = futures::stream::FuturesUnordered::new();
            loop {
                let next = tokio::select! {
                    Some(()) = running.next(), if !running.is_empty() => continue,
                    next = incoming.message(), if running.len() < PIPELINE_IN_FLIGHT_MAX => next,
                    _ = stopping.wait_for(|stop| *stop) => return,
                };
                let request = match next {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        // A malformed frame ends the stream with its status; the node goes on.
                        let _ = replies.send(Err(status)).await;
                        return;
                    }
                };
                let (ops, replies, token) = (ops.clone(), replies.clone(), token.clone());
                running.push(async move {
                    let started = std::time::Instant::now();
                    let op = request.op.as_ref().map_or("none", dispatch::pipeline_op_name);
                    let result = match ops.authenticate(Some(&token)) {
                        Ok(user) => dispatch::pipeline(&ops, &user, request.op).await,
                        Err(e) => Err(e),
                    };
                    ops.node().metrics.observe_result(crate::metrics::Surface::Grpc, op, &result, started);
                    let result =
                        result.unwrap_or_else(|e| pb::pipeline_reply::Result::Error(dispatch::pipeline_error(&e)));
                    let _ = replies.send(Ok(pb::PipelineReply { id: request.id, result: Some(result) })).await;
                });
            }
            // The client closed its side: what runs still answers.
            finish(&mut running, &mut stopping).await;
        });
        let replies = tokio_stream::wrappers::ReceiverStream::new(outgoing);
        Ok(Response::new(Box::pin(until_stopped(replies, self.stopped.clone()))))
    }

    type SubscribeRoomsStream = crate::connections::Counted<
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::SubscribeRoomsReply, Status>> + Send>>,
    >;

    async fn subscribe_rooms(
        &self,
        request: Request<tonic::Streaming<pb::SubscribeRoomsRequest>>,
    ) -> Result<Response<Self::SubscribeRoomsStream>, Status> {
        let token = self.stream_token(&request)?;
        // The stream counts as one subscription on its connection while it lives.
        let slot = request.extensions().get::<ConnectionInfo>().map(ConnectionInfo::subscription).transpose()?;
        let events = crate::subscribe_rooms::serve(self.ops.clone(), token, request.into_inner(), self.stopped.clone());
        let events = until_stopped(events, self.stopped.clone());
        Ok(Response::new(crate::connections::Counted::new(Box::pin(events), slot)))
    }

    async fn typing(&self, request: Request<pb::TypingRequest>) -> Result<Response<pb::EventAck>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::typing(&self.ops, &user, request.into_inner()).await?))
    }

    async fn mark_read(&self, request: Request<pb::MarkReadRequest>) -> Result<Response<pb::EventAck>, Status> {
        let user = self.user(&request)?;
        Ok(Response::new(dispatch::mark_read(&self.ops, &user, request.into_inner()).await?))
    }
}

/// `palaver.v1.AdminService`.
#[derive(Debug)]
struct AdminApi {
    node: Arc<NodeInner>,
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        crate::cluster::refresh_view(&self.node).await;
        let view = self.node.view().clone();
        let nodes = view.nodes();
        // Every node's own report and the DHT's directory records, asked for together.
        let reports = join_all(nodes.iter().map(|(id, addr)| {
            let node = self.node.clone();
            let (id, addr) = (*id, addr.clone());
            async move {
                if id == node.id {
                    return (id, Some(local_status(&node)));
                }
                let Ok(link) = node.replicas.peers().link(&addr) else { return (id, None) };
                let mut client = link.client();
                let call = client.local_status(pb::LocalStatusRequest {});
                match tokio::time::timeout(Duration::from_millis(STATUS_NODE_TIMEOUT_MS), call).await {
                    Ok(Ok(reply)) => (id, Some(reply.into_inner())),
                    _ => (id, None),
                }
            }
        }));
        let (reports, directory) = tokio::join!(reports, crate::directory::directory_view(&self.node));
        let mut shards: BTreeMap<u32, pb::ShardStatus> = (0..=self.node.identity.shard_count)
            .map(|s| {
                let placement = view.placement(ShardId(s)).iter().map(|n| n.0).collect();
                (s, pb::ShardStatus { shard: s, placement, ..Default::default() })
            })
            .collect();
        for (shard, record) in directory {
            let Some(entry) = shards.get_mut(&shard.0) else { continue };
            entry.directory = Some(match record {
                Some(record) => pb::DirectoryRecord {
                    found: true,
                    replicas: record.replicas.iter().map(|n| n.0).collect(),
                    leader: record.leader.map_or(0, |n| n.0),
                    term: record.epoch.term,
                    config_index: record.epoch.config_index,
                },
                None => pb::DirectoryRecord::default(),
            });
        }
        let mut node_list = Vec::new();
        for (id, report) in &reports {
            node_list.push(pb::NodeStatus {
                node_id: id.0,
                grpc_addr: nodes.get(id).cloned().unwrap_or_default(),
                reachable: report.is_some(),
                peer_id: report.as_ref().map(|r| r.peer_id.clone()).unwrap_or_default(),
                p2p_addrs: report.as_ref().map(|r| r.p2p_addrs.clone()).unwrap_or_default(),
                dht_peers: report.as_ref().map(|r| r.dht_peers.clone()).unwrap_or_default(),
                feeds_open: report.as_ref().map_or(0, |r| r.feeds_open),
                http_addr: report.as_ref().map(|r| r.http_addr.clone()).unwrap_or_default(),
            });
            for local in report.iter().flat_map(|r| r.shards.iter()) {
                let Some(entry) = shards.get_mut(&local.shard) else { continue };
                entry.replicas.extend(local.replicas.iter().cloned());
                let is_leader = local.replicas.iter().any(|r| r.state == "leader");
                if is_leader || local.term > entry.term {
                    entry.term = local.term.max(entry.term);
                    entry.leader = if is_leader { local.leader } else { entry.leader.max(local.leader) };
                    entry.voters = local.voters.clone();
                    entry.learners = local.learners.clone();
                    entry.last_applied_index = local.last_applied_index;
                }
            }
        }
        Ok(Response::new(pb::StatusResponse {
            cluster_id: self.node.identity.cluster_id.clone(),
            answered_by: self.node.id.0,
            nodes: node_list,
            shards: shards.into_values().collect(),
            routes: Some(self.node.directory.counters()),
        }))
    }
}

/// This node's report on each of its replicas.
fn local_status(node: &NodeInner) -> pb::LocalStatusReply {
    let shards = node
        .replicas
        .all()
        .into_iter()
        .map(|replica| {
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow_watched().clone();
            let membership = metrics.membership_config.membership();
            let state = match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            };
            let report = pb::ReplicaStatus {
                node_id: node.id.0,
                term: metrics.current_term,
                leader: metrics.current_leader.unwrap_or(0),
                last_applied_index: metrics.last_applied.as_ref().map_or(0, |id| id.index),
                last_log_index: metrics.last_log_index.unwrap_or(0),
                snapshot_index: metrics.snapshot.as_ref().map_or(0, |id| id.index),
                state: state.to_owned(),
                asleep: node.quiesce.is_asleep(replica.shard),
            };
            pb::ShardStatus {
                shard: replica.shard.0,
                voters: membership.voter_ids().collect(),
                learners: membership.learner_ids().collect(),
                leader: report.leader,
                term: report.term,
                last_applied_index: report.last_applied_index,
                placement: Vec::new(),
                replicas: vec![report],
                directory: None,
            }
        })
        .collect();
    pb::LocalStatusReply {
        node_id: node.id.0,
        shards,
        peer_id: node.directory.peer_id(),
        p2p_addrs: node.directory.p2p_addrs(),
        dht_peers: node.directory.dht_peers(),
        feeds_open: u32::try_from(node.feeds.open()).unwrap_or(u32::MAX),
        http_addr: node.http_addr.clone().unwrap_or_default(),
    }
}

/// A Raft message waiting for its group's turn on a link, with its in-flight permit.
type GroupCall = (pb::LinkCall, OwnedSemaphorePermit);

/// Run what is left in `running` to its end, or until the node stops.
async fn finish<F: Future<Output = ()>>(
    running: &mut futures::stream::FuturesUnordered<F>,
    stopping: &mut watch::Receiver<bool>,
) {
    tokio::select! {
        () = async { while running.next().await.is_some() {} } => {}
        _ = stopping.wait_for(|stop| *stop) => {}
    }
}

/// `stream`, ended as soon as the node stops, so that graceful shutdown does not wait on it.
fn until_stopped<S: futures::Stream>(
    stream: S,
    mut stopped: watch::Receiver<bool>,
) -> impl futures::Stream<Item = S::Item> {
    stream.take_until(async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    })
}

/// `palaver.v1.PeerService`.
#[derive(Debug, Clone)]
struct PeerApi {
    node: Arc<NodeInner>,
    /// Links end when this turns true, so that shutdown does not wait on them.
    stopped: watch::Receiver<bool>,
}

impl PeerApi {
    async fn replica_for(&self, shard: u32, create: bool) -> Result<palaver_shard::Replica, String> {
        let shard = ShardId(shard);
        if let Some(replica) = self.node.replicas.get(shard) {
            return Ok(replica);
        }
        if !create || shard.0 > self.node.identity.shard_count {
            return Err(format!("node {} holds no replica of shard {shard}", self.node.id));
        }
        // A leader is adding this node to the shard before our own reconcile started it.
        // Boxed: starting a Raft group is a large future, and rare.
        Box::pin(self.node.replicas.ensure(shard)).await.map_err(|e| e.to_string())
    }

    /// Answer `call` on `answers`, then give its in-flight permit back (if it holds one).
    async fn answer_to(
        &self,
        call: pb::LinkCall,
        answers: &mpsc::Sender<pb::LinkAnswer>,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let body = self.answer(call.body).await;
        let _ = answers.send(pb::LinkAnswer { id: call.id, body: Some(body) }).await;
        drop(permit);
    }

    /// Answer one call of a link; failures become the error answer, timeouts included.
    async fn answer(&self, body: Option<pb::link_call::Body>) -> pb::link_answer::Body {
        use pb::link_answer::Body as Answer;
        use pb::link_call::Body as Call;
        let work = async {
            match body {
                Some(Call::Raft(message)) => Ok(Answer::Raft(pb::RaftReply {
                    result: Some(match self.raft_one(message).await {
                        Ok(bytes) => pb::raft_reply::Result::Payload(bytes),
                        Err(e) => pb::raft_reply::Result::Error(e),
                    }),
                })),
                Some(Call::Forward(request)) => self.forward(request).await.map(Answer::Forward),
                Some(Call::Read(request)) => self.read(request).await.map(Answer::Read),
                Some(Call::Crdt(request)) => self.crdt(request).await.map(Answer::Crdt),
                Some(Call::CrdtBatch(request)) => self.crdt_batch(request).await.map(Answer::Crdt),
                Some(Call::Beat(beat)) => Ok(Answer::Beat(self.node.quiesce.on_beat(&self.node, &beat))),
                Some(Call::Client(frame)) => {
                    let ops = crate::ops::Ops::new(self.node.clone());
                    crate::remote::answer(&ops, &frame).await.map(Answer::Client).map_err(Status::from)
                }
                None => Err(Status::invalid_argument("empty link call")),
            }
        };
        let timeout = Duration::from_millis(crate::env::PEER_REQUEST_TIMEOUT_MS);
        let result = tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("timed out on the answering node")));
        result.unwrap_or_else(|status| {
            Answer::Error(pb::LinkError { code: status.code() as i32, message: status.message().to_owned() })
        })
    }

    async fn forward(&self, request: pb::ForwardRequest) -> Result<pb::ForwardReply, Status> {
        let command: Command =
            keys::decode(&request.command).map_err(|e| Status::invalid_argument(format!("malformed command: {e}")))?;
        match routing::execute_local(&self.node, ShardId(request.shard), command).await {
            Ok(done) => Ok(pb::ForwardReply {
                result: Some(pb::forward_reply::Result::Outcome(
                    keys::encode(&done.outcome).map_err(|e| Status::internal(e.to_string()))?,
                )),
                log_index: done.log_index,
            }),
            Err(LocalError::NotLeader(hint)) => Ok(pb::ForwardReply {
                result: Some(pb::forward_reply::Result::Redirect(routing::redirect(
                    &self.node,
                    hint,
                    "not the leader",
                ))),
                log_index: 0,
            }),
            Err(LocalError::Api(e)) => Err(e.into()),
        }
    }

    async fn read(&self, request: pb::ReadRequest) -> Result<pb::ReadReply, Status> {
        let query =
            keys::decode(&request.query).map_err(|e| Status::invalid_argument(format!("malformed query: {e}")))?;
        let result = match routing::read_local(&self.node, ShardId(request.shard), &query).await {
            Ok(answer) => {
                pb::read_reply::Result::Answer(keys::encode(&answer).map_err(|e| Status::internal(e.to_string()))?)
            }
            Err(LocalError::NotLeader(hint)) => {
                pb::read_reply::Result::Redirect(routing::redirect(&self.node, hint, "not the leader"))
            }
            Err(LocalError::Api(e)) => return Err(e.into()),
        };
        Ok(pb::ReadReply { result: Some(result) })
    }

    async fn crdt(&self, request: pb::CrdtRequest) -> Result<pb::CrdtReply, Status> {
        let replica = self.replica_for(request.shard, false).await.map_err(Status::failed_precondition)?;
        let message = keys::decode(&request.payload)
            .map_err(|e| Status::invalid_argument(format!("malformed replication message: {e}")))?;
        let answer =
            crate::replication::handle(&replica.crdt, palaver_ids::NodeId(request.from), message, self.node.now_ms())
                .await
                .map_err(Status::internal)?;
        let payload = keys::encode(&answer).map_err(|e| Status::internal(e.to_string()))?;
        Ok(pb::CrdtReply { payload })
    }

    async fn crdt_batch(&self, request: pb::CrdtBatchRequest) -> Result<pb::CrdtReply, Status> {
        let shards: Vec<crate::replication::ShardPush> = keys::decode(&request.payload)
            .map_err(|e| Status::invalid_argument(format!("malformed replication batch: {e}")))?;
        let mut stores = Vec::with_capacity(shards.len());
        for push in shards {
            let store = self.replica_for(push.shard.0, false).await.map(|replica| replica.crdt);
            stores.push((push, store));
        }
        let from = palaver_ids::NodeId(request.from);
        let answer = crate::replication::handle_batch(stores, from, self.node.now_ms()).await;
        let payload = keys::encode(&answer).map_err(|e| Status::internal(e.to_string()))?;
        Ok(pb::CrdtReply { payload })
    }

    async fn raft_one(&self, message: pb::RaftMessage) -> Result<Vec<u8>, String> {
        let kind = pb::RaftKind::try_from(message.kind).map_err(|_| "unknown raft kind".to_string())?;
        let replica = self.replica_for(message.shard, kind == pb::RaftKind::Append).await?;
        let raft = &replica.raft;
        let frame = |e: palaver_shard::StorageError| e.to_string();
        // openraft's futures are boxed (kilobytes each), so that this one does not make every
        // link call's future as large.
        match kind {
            pb::RaftKind::Append => {
                let request = keys::decode(&message.payload).map_err(frame)?;
                let response = Box::pin(raft.append_entries(request)).await.map_err(|e| e.to_string())?;
                keys::encode(&response).map_err(frame)
            }
            pb::RaftKind::Vote => {
                let request = keys::decode(&message.payload).map_err(frame)?;
                let response = Box::pin(raft.vote(request)).await.map_err(|e| e.to_string())?;
                keys::encode(&response).map_err(frame)
            }
            pb::RaftKind::PreVote => {
                let request = keys::decode(&message.payload).map_err(frame)?;
                let response = Box::pin(raft.pre_vote(request)).await.map_err(|e| e.to_string())?;
                keys::encode(&response).map_err(frame)
            }
            pb::RaftKind::TransferLeader => {
                let request = keys::decode(&message.payload).map_err(frame)?;
                let response = Box::pin(raft.handle_transfer_leader(request)).await.map_err(|e| e.to_string())?;
                keys::encode(&response).map_err(frame)
            }
            pb::RaftKind::Unspecified => Err("unspecified raft kind".into()),
        }
    }
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    type LinkStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LinkAnswers, Status>> + Send>>;

    async fn link(
        &self,
        request: Request<tonic::Streaming<pb::LinkCalls>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        let mut incoming = request.into_inner();
        let (answers, outgoing) = mpsc::channel::<pb::LinkAnswer>(LINK_CALLS_IN_FLIGHT_MAX);
        let api = self.clone();
        let mut stopping = self.stopped.clone();
        let limit = Arc::new(Semaphore::new(LINK_CALLS_IN_FLIGHT_MAX));
        tokio::spawn(async move {
            // Raft messages of one shard run one after another, in the order they came: openraft
            // replicates as if over one ordered stream per group and peer; each group has a task
            // of its own. Every other call runs concurrently with the rest on this task (a slow
            // one, a forwarded command waiting for its commit, holds up nothing): no task spawned
            // and woken per call. The caller keeps at most LINK_CALLS_IN_FLIGHT_MAX outstanding;
            // so does this side.
            let mut groups: HashMap<u32, mpsc::UnboundedSender<GroupCall>> = HashMap::new();
            let mut running = futures::stream::FuturesUnordered::new();
            loop {
                let frame = tokio::select! {
                    Some(()) = running.next(), if !running.is_empty() => continue,
                    frame = incoming.message(), if running.len() < LINK_CALLS_IN_FLIGHT_MAX => frame,
                    _ = stopping.wait_for(|stop| *stop) => return,
                };
                let Ok(Some(frame)) = frame else { break };
                for call in frame.calls {
                    let Some(pb::link_call::Body::Raft(message)) = &call.body else {
                        let (api, answers) = (api.clone(), answers.clone());
                        running.push(async move { api.answer_to(call, &answers, None).await });
                        continue;
                    };
                    let Ok(permit) = limit.clone().acquire_owned().await else { return };
                    let group = groups.entry(message.shard).or_insert_with(|| {
                        let (queue, mut next) = mpsc::unbounded_channel::<GroupCall>();
                        let (api, answers) = (api.clone(), answers.clone());
                        tokio::spawn(async move {
                            while let Some((call, permit)) = next.recv().await {
                                api.answer_to(call, &answers, Some(permit)).await;
                            }
                        });
                        queue
                    });
                    let _ = group.send((call, permit));
                }
            }
            // The caller closed its side: what runs still answers.
            finish(&mut running, &mut stopping).await;
        });
        let frames = futures::stream::unfold(outgoing, |mut outgoing| async move {
            let answers = next_batch(&mut outgoing, LINK_CALLS_PER_FRAME_MAX).await?;
            Some((Ok(pb::LinkAnswers { answers }), outgoing))
        });
        Ok(Response::new(Box::pin(until_stopped(frames, self.stopped.clone()))))
    }

    async fn install_snapshot(&self, request: Request<pb::SnapshotRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let request = request.into_inner();
        let result = async {
            let replica = self.replica_for(request.shard, true).await?;
            let vote: Vote = keys::decode(&request.vote).map_err(|e| e.to_string())?;
            let meta: SnapshotMeta = keys::decode(&request.meta).map_err(|e| e.to_string())?;
            let snapshot = Snapshot { meta, snapshot: std::io::Cursor::new(request.data) };
            let response = replica.raft.install_full_snapshot(vote, snapshot).await.map_err(|e| e.to_string())?;
            keys::encode(&response).map_err(|e| e.to_string())
        }
        .await;
        Ok(Response::new(pb::RaftReply {
            result: Some(match result {
                Ok(bytes) => pb::raft_reply::Result::Payload(bytes),
                Err(e) => pb::raft_reply::Result::Error(e),
            }),
        }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        let request = request.into_inner();
        if request.grpc_addr.is_empty()
            || request.grpc_addr.len() > 256
            || request.grpc_addr.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ApiError::invalid("grpc_addr", "must be an IP:port").into());
        }
        let command = Command::AddNode { grpc_addr: request.grpc_addr, at_ms: self.node.now_ms() };
        let done = routing::submit(&self.node, ShardId::META, command).await?;
        let Outcome::NodeAdded(node_id) = done.outcome else {
            return Err(Status::failed_precondition(format!("join refused: {:?}", done.outcome)));
        };
        let identity = &self.node.identity;
        Ok(Response::new(pb::JoinReply {
            node_id: node_id.0,
            cluster_id: identity.cluster_id.clone(),
            token_secret: identity.token_secret.clone(),
            shard_count: identity.shard_count,
            p2p_addrs: self.node.directory.p2p_addrs(),
        }))
    }

    async fn cluster_map(
        &self,
        _request: Request<pb::ClusterMapRequest>,
    ) -> Result<Response<pb::ClusterMapReply>, Status> {
        let view = self.node.view().clone();
        let cluster = match &view.info {
            Some(info) => keys::encode(info).map_err(|e| Status::internal(e.to_string()))?,
            None => Vec::new(),
        };
        Ok(Response::new(pb::ClusterMapReply {
            cluster,
            applied_index: view.applied_index,
            p2p_addrs: self.node.directory.p2p_addrs(),
        }))
    }

    type FollowStream = crate::subscribe::EventStream;

    async fn follow(&self, request: Request<pb::FollowRequest>) -> Result<Response<Self::FollowStream>, Status> {
        let request = request.into_inner();
        let have = convert::version_vector_from_pb(request.have.as_ref());
        let ops = crate::ops::Ops::new(self.node.clone());
        Ok(Response::new(ops.follow(&request.room, have).await?))
    }

    type FollowRoomsStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::FollowEvents, Status>> + Send>>;

    async fn follow_rooms(
        &self,
        request: Request<tonic::Streaming<pb::FollowControl>>,
    ) -> Result<Response<Self::FollowRoomsStream>, Status> {
        let ops = crate::ops::Ops::new(self.node.clone());
        let events = crate::follow::serve(ops, request.into_inner(), self.stopped.clone());
        Ok(Response::new(Box::pin(until_stopped(events, self.stopped.clone()))))
    }

    async fn local_status(
        &self,
        _request: Request<pb::LocalStatusRequest>,
    ) -> Result<Response<pb::LocalStatusReply>, Status> {
        Ok(Response::new(local_status(&self.node)))
    }
}
