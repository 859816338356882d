//! The chat client's side of the wire: one gRPC channel to the node named by `--addr`, the
//! login token, the unary calls (idempotent writes retried while the error says a retry can
//! succeed), and `SubscribeRooms` streams carrying the joined rooms (one stream per
//! [`ROOMS_PER_STREAM_MAX`] rooms, the most a node runs on one stream).
//!
//! Each stream's task keeps each of its rooms' version vector and passes each event on once: an
//! event whose dot the vector covers is dropped. When the stream breaks (the node died, the
//! channel reconnected), the task opens another and resubscribes every room from its vector,
//! after a pause that doubles from [`RESUBSCRIBE_BACKOFF_MS_MIN`] to
//! [`RESUBSCRIBE_BACKOFF_MS_MAX`], so the client misses nothing and sees nothing twice. One
//! room whose subscription ends (`resource_exhausted` for a slow reader, `unavailable`) is
//! resumed alone the same way, with its own pause; an error that no retry can fix
//! (`not_member`, `room_not_found`, `unauthenticated`, …) ends that room's subscription.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use palaver_proto::v1 as pb;
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::room_event::Event;
use palaver_proto::v1::room_subscription_event::Body;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::state::{Link, Position};

/// First pause before resubscribing after a broken stream.
pub const RESUBSCRIBE_BACKOFF_MS_MIN: u64 = 100;
/// Longest pause between resubscriptions.
pub const RESUBSCRIBE_BACKOFF_MS_MAX: u64 = 5_000;
/// Most attempts of one unary call whose error says a retry can succeed.
pub const CALL_ATTEMPTS_MAX: u32 = 6;
/// First pause between attempts of a unary call (doubled each time, or the server's
/// `retry-after-ms` if it says more).
pub const CALL_RETRY_MS_MIN: u64 = 200;
/// Longest pause between attempts of a unary call.
pub const CALL_RETRY_MS_MAX: u64 = 5_000;
/// Longest a unary call (or the start of a subscription) may take.
pub const CALL_TIMEOUT_MS: u64 = 30_000;
/// Events and notices queued from the subscription tasks to the client.
pub const INCOMING_QUEUE_EVENTS: usize = 1_024;
/// How often HTTP/2 pings check a quiet connection (so a dead node is noticed).
pub const KEEPALIVE_INTERVAL_MS: u64 = 5_000;
/// How long a ping may go unanswered before the connection counts as dead.
pub const KEEPALIVE_TIMEOUT_MS: u64 = 10_000;

const _: () = assert!(RESUBSCRIBE_BACKOFF_MS_MIN < RESUBSCRIBE_BACKOFF_MS_MAX);
const _: () = assert!(CALL_RETRY_MS_MIN < CALL_RETRY_MS_MAX);
const _: () = assert!(KEEPALIVE_INTERVAL_MS < KEEPALIVE_TIMEOUT_MS);

/// What the subscription tasks tell the client.
#[derive(Debug)]
pub enum Incoming {
    /// An event of a room, not seen before.
    Event(Box<pb::RoomEvent>),
    /// A room's subscription changed state; `error` says why it is reconnecting.
    Link { room: String, link: Link, error: Option<String> },
    /// A room's subscription ended for good, with the reason.
    Ended { room: String, reason: String },
}

/// A channel to the nodes named in `addrs` (comma-separated gRPC addresses), not yet logged
/// in. With several, calls are spread over the nodes that answer: when one dies, the next call
/// (and the resubscription of each room) goes to another.
pub fn connect(addrs: &str) -> anyhow::Result<ChatServiceClient<Channel>> {
    let mut endpoints = Vec::new();
    for addr in addrs.split(',').map(str::trim).filter(|a| !a.is_empty()) {
        let endpoint = Channel::from_shared(format!("http://{addr}"))
            .map_err(|e| anyhow::anyhow!("bad address {addr}: {e}"))?
            .connect_timeout(Duration::from_millis(CALL_TIMEOUT_MS))
            .http2_keep_alive_interval(Duration::from_millis(KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(Duration::from_millis(KEEPALIVE_TIMEOUT_MS))
            .keep_alive_while_idle(true);
        endpoints.push(endpoint);
    }
    let channel = match endpoints.len() {
        0 => anyhow::bail!("no node address given"),
        1 => endpoints.remove(0).connect_lazy(),
        _ => Channel::balance_list(endpoints.into_iter()),
    };
    Ok(ChatServiceClient::new(channel))
}

/// palaver's error code of a failed call (the `palaver-error` metadata), or the gRPC code's
/// name if the answer carried none (e.g. the node could not be reached).
pub fn error_code(status: &Status) -> String {
    match status.metadata().get("palaver-error").and_then(|v| v.to_str().ok()) {
        Some(code) => code.to_owned(),
        None => format!("{:?}", status.code()).to_lowercase(),
    }
}

/// A failed call, for people: `code: message`.
pub fn describe(status: &Status) -> String {
    format!("{}: {}", error_code(status), status.message())
}

/// Whether the same call may succeed later unchanged.
fn retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::ResourceExhausted | Code::DeadlineExceeded | Code::Aborted)
        || (status.code() == Code::Unknown && status.metadata().get("palaver-error").is_none())
}

/// How long the server asked to wait before retrying (`retry-after-ms`), if it did.
fn retry_after_ms(status: &Status) -> Option<u64> {
    status.metadata().get("retry-after-ms")?.to_str().ok()?.parse().ok()
}

/// Run `call` until it succeeds, fails for good, or [`CALL_ATTEMPTS_MAX`] attempts failed.
async fn with_retries<T, F, Fut>(call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    retry_paced(call, CALL_RETRY_MS_MIN).await
}

/// [`with_retries`], with the first pause given.
async fn retry_paced<T, F, Fut>(mut call: F, first_pause_ms: u64) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut pause_ms = first_pause_ms;
    let mut attempt = 1;
    loop {
        let result = match tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), call()).await {
            Ok(result) => result,
            Err(_) => Err(Status::deadline_exceeded(format!("no answer within {CALL_TIMEOUT_MS} ms"))),
        };
        match result {
            Err(status) if retryable(&status) && attempt < CALL_ATTEMPTS_MAX => {
                let wait_ms = retry_after_ms(&status).unwrap_or(pause_ms).min(CALL_RETRY_MS_MAX);
                tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                pause_ms = (pause_ms * 2).min(CALL_RETRY_MS_MAX);
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A logged-in user on one node.
#[derive(Debug, Clone)]
pub struct Session {
    client: ChatServiceClient<Channel>,
    token: String,
    /// The user's name.
    pub user: String,
}

impl Session {
    /// Log in as `user` (registering first if `register`; a taken name is not an error then,
    /// the login decides). The error says what failed, for people.
    pub async fn login(
        client: ChatServiceClient<Channel>,
        user: &str,
        password: &str,
        register: bool,
    ) -> Result<Self, String> {
        if register {
            let request = pb::RegisterRequest { user: user.to_owned(), password: password.to_owned() };
            let register = || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.register(request).await }
            };
            match with_retries(register).await {
                Ok(_) => {}
                Err(status) if error_code(&status) == "user_exists" => {}
                Err(status) => return Err(format!("cannot register {user}: {}", describe(&status))),
            }
        }
        let request = pb::LoginRequest { user: user.to_owned(), password: password.to_owned() };
        let login = || {
            let (mut client, request) = (client.clone(), request.clone());
            async move { client.login(request).await }
        };
        let answer = with_retries(login)
            .await
            .map_err(|status| format!("login as {user} failed: {}", describe(&status)))?
            .into_inner();
        Ok(Self { client, token: answer.token, user: user.to_owned() })
    }

    fn authed<T>(&self, message: T) -> Result<tonic::Request<T>, Status> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| Status::unauthenticated("the login token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }

    /// One authenticated unary call, retried as [`with_retries`] says.
    async fn call<Req, Resp, F, Fut>(&self, request: Req, op: F) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(ChatServiceClient<Channel>, tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let attempt = || {
            let client = self.client.clone();
            let request = self.authed(request.clone());
            let op = &op;
            async move { op(client, request?).await }
        };
        Ok(with_retries(attempt).await?.into_inner())
    }

    /// Rooms the user can see, with unread counts.
    pub async fn list_rooms(&self) -> Result<Vec<pb::RoomSummary>, Status> {
        let answer = self.call(pb::ListRoomsRequest {}, |mut c, r| async move { c.list_rooms(r).await }).await?;
        Ok(answer.rooms)
    }

    /// Join `room` (already being a member is fine).
    pub async fn join(&self, room: &str) -> Result<(), Status> {
        let request = pb::RoomRequest { room: room.to_owned() };
        match self.call(request, |mut c, r| async move { c.join(r).await }).await {
            Err(status) if error_code(&status) != "already_member" => Err(status),
            _ => Ok(()),
        }
    }

    /// Create `room`, owned by the user.
    pub async fn create(&self, room: &str) -> Result<(), Status> {
        let request = pb::CreateRoomRequest { room: room.to_owned(), ..Default::default() };
        self.call(request, |mut c, r| async move { c.create_room(r).await }).await.map(|_| ())
    }

    /// Leave `room`.
    pub async fn leave(&self, room: &str) -> Result<(), Status> {
        let request = pb::RoomRequest { room: room.to_owned() };
        self.call(request, |mut c, r| async move { c.leave(r).await }).await.map(|_| ())
    }

    /// Post `body` to `room`, ordered after `seen`. One random client message id for every
    /// attempt, so a retry never posts twice.
    pub async fn post(&self, room: &str, body: &str, seen: Option<Position>) -> Result<pb::PostResponse, Status> {
        let request = pb::PostRequest {
            room: room.to_owned(),
            body: body.to_owned(),
            client_message_id: format!("{:032x}", rand::random::<u128>()),
            ack: pb::AckLevel::Quorum as i32,
            seen: seen.map(Position::to_pb),
        };
        self.call(request, |mut c, r| async move { c.post(r).await }).await
    }

    /// Replace the body of a message.
    pub async fn edit(&self, room: &str, message_id: &str, body: &str) -> Result<(), Status> {
        let request = pb::EditRequest {
            room: room.to_owned(),
            message_id: message_id.to_owned(),
            body: body.to_owned(),
            ack: pb::AckLevel::Quorum as i32,
        };
        self.call(request, |mut c, r| async move { c.edit(r).await }).await.map(|_| ())
    }

    /// Add (or take back) a reaction.
    pub async fn react(&self, room: &str, message_id: &str, reaction: &str, remove: bool) -> Result<(), Status> {
        let request = pb::ReactRequest {
            room: room.to_owned(),
            message_id: message_id.to_owned(),
            reaction: reaction.to_owned(),
            remove,
            ack: pb::AckLevel::Quorum as i32,
        };
        self.call(request, |mut c, r| async move { c.react(r).await }).await.map(|_| ())
    }

    /// Redact a message.
    pub async fn redact(&self, room: &str, message_id: &str) -> Result<(), Status> {
        let request = pb::MessageRequest {
            room: room.to_owned(),
            message_id: message_id.to_owned(),
            ack: pb::AckLevel::Quorum as i32,
        };
        self.call(request, |mut c, r| async move { c.redact(r).await }).await.map(|_| ())
    }

    /// A page of `limit` messages before `before` (the newest if `None`), newest first.
    pub async fn history(
        &self,
        room: &str,
        before: Option<Position>,
        limit: u32,
    ) -> Result<pb::HistoryResponse, Status> {
        let request = pb::HistoryRequest {
            room: room.to_owned(),
            before: before.map(Position::to_pb),
            limit,
            ..Default::default()
        };
        self.call(request, |mut c, r| async move { c.history(r).await }).await
    }

    /// Move the read marker of `room` to `position`.
    pub async fn mark_read(&self, room: &str, position: Position) -> Result<(), Status> {
        let request = pb::MarkReadRequest { room: room.to_owned(), position: Some(position.to_pb()) };
        self.call(request, |mut c, r| async move { c.mark_read(r).await }).await.map(|_| ())
    }

    /// Open a `SubscribeRooms` stream whose starts and stops are `requests`.
    async fn subscribe_rooms(
        &self,
        requests: mpsc::Receiver<pb::SubscribeRoomsRequest>,
    ) -> Result<tonic::Streaming<pb::SubscribeRoomsReply>, Status> {
        let mut client = self.client.clone();
        let request = self.authed(tokio_stream::wrappers::ReceiverStream::new(requests))?;
        match tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), client.subscribe_rooms(request)).await {
            Ok(result) => Ok(result?.into_inner()),
            Err(_) => Err(Status::deadline_exceeded(format!("no subscription within {CALL_TIMEOUT_MS} ms"))),
        }
    }
}

/// The client's subscriptions: one task per `SubscribeRooms` stream, each keeping up to
/// [`ROOMS_PER_STREAM_MAX`] joined rooms on its stream (a node runs at most that many
/// subscriptions on one stream), started with the first room it gets; all aborted and awaited
/// at shutdown.
#[derive(Debug, Default)]
pub struct Subscriptions {
    drivers: Vec<(mpsc::UnboundedSender<Control>, JoinHandle<()>)>,
    placement: Placement,
}

/// Most rooms the client keeps on one stream: the node's limit.
pub const ROOMS_PER_STREAM_MAX: usize = palaver_node::subscribe_rooms::SUBSCRIBE_ROOMS_PER_STREAM_MAX;

/// Which stream follows each room: a room stays on the stream it was placed on until stopped;
/// a new room goes to the first stream with room to spare, or to a new one.
#[derive(Debug, Default)]
struct Placement {
    streams: Vec<usize>,
    rooms: HashMap<String, usize>,
}

impl Placement {
    /// The stream for `room` (placing it if new).
    fn place(&mut self, room: &str) -> usize {
        if let Some(stream) = self.rooms.get(room) {
            return *stream;
        }
        let stream = match self.streams.iter().position(|count| *count < ROOMS_PER_STREAM_MAX) {
            Some(stream) => stream,
            None => {
                self.streams.push(0);
                self.streams.len() - 1
            }
        };
        self.streams[stream] += 1;
        self.rooms.insert(room.to_owned(), stream);
        stream
    }

    /// Forget `room`: the stream that followed it, if one did.
    fn remove(&mut self, room: &str) -> Option<usize> {
        let stream = self.rooms.remove(room)?;
        self.streams[stream] -= 1;
        Some(stream)
    }
}

/// What the client asks of a subscription task.
#[derive(Debug)]
enum Control {
    /// Follow a room from a version vector (replacing a running subscription to it).
    Start { room: String, have: BTreeMap<u64, u64> },
    /// Stop following a room.
    Stop(String),
}

impl Subscriptions {
    /// Subscribe to `room` from the version vector `have` (replacing a running subscription),
    /// passing its events to `out`.
    pub fn start(&mut self, session: &Session, room: &str, have: BTreeMap<u64, u64>, out: &mpsc::Sender<Incoming>) {
        let stream = self.placement.place(room);
        while self.drivers.len() <= stream {
            let (controls, receiver) = mpsc::unbounded_channel();
            self.drivers.push((controls, tokio::spawn(drive(session.clone(), receiver, out.clone()))));
        }
        let _ = self.drivers[stream].0.send(Control::Start { room: room.to_owned(), have });
    }

    /// Stop the subscription to `room`, if any.
    pub fn stop(&mut self, room: &str) {
        if let Some(stream) = self.placement.remove(room)
            && let Some((controls, _)) = self.drivers.get(stream)
        {
            let _ = controls.send(Control::Stop(room.to_owned()));
        }
    }

    /// Stop every subscription and wait until the tasks are gone.
    pub async fn shutdown(&mut self) {
        for (_, task) in self.drivers.drain(..) {
            task.abort();
            let _ = task.await;
        }
        self.placement = Placement::default();
    }
}

/// One followed room: its id on the current stream, what it holds, its own backoff.
#[derive(Debug)]
struct Followed {
    id: u64,
    have: BTreeMap<u64, u64>,
    pause_ms: u64,
}

/// The start of `followed` on a stream, under a fresh id.
fn start_of(room: &str, followed: &mut Followed, next_id: &mut u64) -> pb::RoomSubscription {
    *next_id += 1;
    followed.id = *next_id;
    let entries = followed.have.iter().map(|(r, c)| (*r, *c)).collect();
    pb::RoomSubscription { id: followed.id, room: room.to_owned(), version_vector: Some(pb::VersionVector { entries }) }
}

/// A subscription's end as the status its own `Subscribe` stream would have ended with.
fn end_status(end: &pb::PipelineError) -> Status {
    let mut status = Status::new(Code::from(end.grpc_code), end.message.clone());
    if let Ok(code) = end.code.parse() {
        status.metadata_mut().insert("palaver-error", code);
    }
    status
}

/// A subscription task: its followed rooms on one stream, resumed from the rooms' version
/// vectors when it breaks (after a pause that doubles while attempts fail); one room whose
/// subscription ends is resumed alone, or reported ended if no retry can help.
async fn drive(session: Session, mut controls: mpsc::UnboundedReceiver<Control>, out: mpsc::Sender<Incoming>) {
    let mut rooms: BTreeMap<String, Followed> = BTreeMap::new();
    let mut next_id = 0u64;
    let mut pause_ms = RESUBSCRIBE_BACKOFF_MS_MIN;
    loop {
        // Without rooms there is nothing to open: wait for one.
        while rooms.is_empty() {
            match controls.recv().await {
                Some(Control::Start { room, have }) => {
                    rooms.insert(room, Followed { id: 0, have, pause_ms: RESUBSCRIBE_BACKOFF_MS_MIN });
                }
                Some(Control::Stop(_)) => {}
                None => return,
            }
        }
        let (requests, outgoing) = mpsc::channel(INCOMING_QUEUE_EVENTS);
        let mut starts = Vec::with_capacity(rooms.len());
        for (room, followed) in &mut rooms {
            let catching_up = Incoming::Link { room: room.clone(), link: Link::CatchingUp, error: None };
            if out.send(catching_up).await.is_err() {
                return;
            }
            starts.push(start_of(room, followed, &mut next_id));
        }
        let _ = requests.try_send(pb::SubscribeRoomsRequest { start: starts, stop: Vec::new() });
        let status = match session.subscribe_rooms(outgoing).await {
            Ok(stream) => {
                let open = Open { requests: &requests, rooms: &mut rooms, next_id: &mut next_id, out: &out };
                match open.serve(stream, &mut controls, &mut pause_ms).await {
                    StreamEnd::Gone => return,
                    StreamEnd::Broken(status) => status,
                }
            }
            Err(status) => status,
        };
        let resume = resumable(&status);
        for room in rooms.keys() {
            let (room, why) = (room.clone(), describe(&status));
            let notice = if resume {
                Incoming::Link { room, link: Link::Reconnecting, error: Some(why) }
            } else {
                Incoming::Ended { room, reason: why }
            };
            if out.send(notice).await.is_err() {
                return;
            }
        }
        if !resume {
            rooms.clear();
            continue;
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        pause_ms = (pause_ms * 2).min(RESUBSCRIBE_BACKOFF_MS_MAX);
    }
}

/// How a stream ended.
enum StreamEnd {
    /// The client stopped listening.
    Gone,
    /// Broken; resubscribe.
    Broken(Status),
}

/// An open stream and what the task keeps for it.
struct Open<'a> {
    requests: &'a mpsc::Sender<pb::SubscribeRoomsRequest>,
    rooms: &'a mut BTreeMap<String, Followed>,
    next_id: &'a mut u64,
    out: &'a mpsc::Sender<Incoming>,
}

impl Open<'_> {
    /// Start `room`'s subscription on the stream under a fresh id, recorded in `by_id`.
    async fn start(&mut self, room: String, by_id: &mut HashMap<u64, String>) -> Result<(), StreamEnd> {
        let Some(followed) = self.rooms.get_mut(&room) else { return Ok(()) };
        let start = start_of(&room, followed, self.next_id);
        by_id.insert(start.id, room.clone());
        let catching_up = Incoming::Link { room, link: Link::CatchingUp, error: None };
        self.out.send(catching_up).await.map_err(|_| StreamEnd::Gone)?;
        let request = pb::SubscribeRoomsRequest { start: vec![start], stop: Vec::new() };
        self.requests.send(request).await.map_err(|_| StreamEnd::Broken(Status::unavailable("stream closed")))
    }

    /// Serve the stream: the client's starts and stops go onto it, each room's new events to
    /// the client once; a room whose subscription ends is resumed alone after its pause, or
    /// reported ended. Returns when the stream breaks or the client stops listening.
    async fn serve(
        mut self,
        mut stream: tonic::Streaming<pb::SubscribeRoomsReply>,
        controls: &mut mpsc::UnboundedReceiver<Control>,
        pause_ms: &mut u64,
    ) -> StreamEnd {
        let mut by_id: HashMap<u64, String> = self.rooms.iter().map(|(room, f)| (f.id, room.clone())).collect();
        // Rooms whose subscription ended, each with the id it ended under, after its pause.
        let mut restarts: FuturesUnordered<Restart> = FuturesUnordered::new();
        loop {
            let step = tokio::select! {
                control = controls.recv() => match control {
                    None => Err(StreamEnd::Gone),
                    Some(Control::Start { room, have }) => {
                        let followed = Followed { id: 0, have, pause_ms: RESUBSCRIBE_BACKOFF_MS_MIN };
                        if let Some(replaced) = self.rooms.insert(room.clone(), followed)
                            && by_id.remove(&replaced.id).is_some()
                        {
                            let request = pb::SubscribeRoomsRequest { start: Vec::new(), stop: vec![replaced.id] };
                            let _ = self.requests.send(request).await;
                        }
                        self.start(room, &mut by_id).await
                    }
                    Some(Control::Stop(room)) => match self.rooms.remove(&room) {
                        Some(followed) => {
                            by_id.remove(&followed.id);
                            let request = pb::SubscribeRoomsRequest { start: Vec::new(), stop: vec![followed.id] };
                            let _ = self.requests.send(request).await;
                            Ok(())
                        }
                        None => Ok(()),
                    },
                },
                Some((room, id)) = restarts.next(), if !restarts.is_empty() => {
                    // Unless the room was stopped or started again meanwhile.
                    match self.rooms.get(&room) {
                        Some(followed) if followed.id == id => self.start(room, &mut by_id).await,
                        _ => Ok(()),
                    }
                }
                reply = stream.message() => match reply {
                    Ok(Some(reply)) => self.take(reply, &mut by_id, &mut restarts, pause_ms).await,
                    Ok(None) => Err(StreamEnd::Broken(Status::unavailable("the node ended the subscriptions"))),
                    Err(status) => Err(StreamEnd::Broken(status)),
                },
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Pass a reply's new events on, advancing each room's vector; a catch-up resets the
    /// backoffs; an end schedules the room's restart or reports it ended.
    async fn take(
        &mut self,
        reply: pb::SubscribeRoomsReply,
        by_id: &mut HashMap<u64, String>,
        restarts: &mut FuturesUnordered<Restart>,
        pause_ms: &mut u64,
    ) -> Result<(), StreamEnd> {
        for event in reply.events {
            // Events of a stopped or replaced subscription may still arrive: dropped.
            let Some(room) = by_id.get(&event.id).cloned() else { continue };
            let Some(followed) = self.rooms.get_mut(&room) else { continue };
            match event.body {
                Some(Body::Event(event)) => {
                    match &event.event {
                        Some(Event::Message(message)) => {
                            let Some(position) = message.position.as_ref() else { continue };
                            let held = followed.have.entry(position.replica).or_default();
                            if position.counter <= *held {
                                continue;
                            }
                            *held = position.counter;
                        }
                        Some(Event::CaughtUp(_)) => {
                            followed.pause_ms = RESUBSCRIBE_BACKOFF_MS_MIN;
                            *pause_ms = RESUBSCRIBE_BACKOFF_MS_MIN;
                        }
                        _ => {}
                    }
                    self.out.send(Incoming::Event(Box::new(event))).await.map_err(|_| StreamEnd::Gone)?;
                }
                Some(Body::End(end)) => {
                    by_id.remove(&event.id);
                    let status = end_status(&end);
                    let notice = if resumable(&status) {
                        let pause = followed.pause_ms;
                        followed.pause_ms = (pause * 2).min(RESUBSCRIBE_BACKOFF_MS_MAX);
                        restarts.push(Box::pin(restart_after(room.clone(), event.id, pause)));
                        Incoming::Link { room, link: Link::Reconnecting, error: Some(describe(&status)) }
                    } else {
                        self.rooms.remove(&room);
                        Incoming::Ended { room, reason: describe(&status) }
                    };
                    self.out.send(notice).await.map_err(|_| StreamEnd::Gone)?;
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// A room's restart: `(room, the id its subscription ended under)`, after its pause.
type Restart = futures::future::BoxFuture<'static, (String, u64)>;

/// `(room, id)` once `pause_ms` has passed.
async fn restart_after(room: String, id: u64, pause_ms: u64) -> (String, u64) {
    tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    (room, id)
}

/// Whether a subscription that ended with `status` can be resumed.
fn resumable(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::NotFound
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::InvalidArgument
            | Code::FailedPrecondition
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_code(code: Code, palaver: Option<&str>) -> Status {
        let mut status = Status::new(code, "x");
        if let Some(palaver) = palaver {
            status.metadata_mut().insert("palaver-error", palaver.parse().expect("ascii"));
        }
        status
    }

    #[test]
    fn errors_are_named_by_their_palaver_code() {
        assert_eq!(error_code(&with_code(Code::NotFound, Some("room_not_found"))), "room_not_found");
        assert_eq!(error_code(&with_code(Code::Unavailable, None)), "unavailable");
        assert_eq!(describe(&with_code(Code::NotFound, Some("room_not_found"))), "room_not_found: x");
    }

    #[test]
    fn only_errors_a_retry_can_fix_are_retried() {
        let table = [
            (Code::Unavailable, Some("quorum_timeout"), true, true),
            (Code::ResourceExhausted, Some("rate_limited"), true, true),
            (Code::Unavailable, None, true, true),
            (Code::Unknown, None, true, true),
            (Code::Internal, Some("internal"), false, true),
            (Code::FailedPrecondition, Some("not_member"), false, false),
            (Code::NotFound, Some("room_not_found"), false, false),
            (Code::Unauthenticated, Some("unauthenticated"), false, false),
            (Code::InvalidArgument, Some("invalid_input"), false, false),
        ];
        for (code, palaver, call, subscription) in table {
            let status = with_code(code, palaver);
            assert_eq!(retryable(&status), call, "call retried on {code:?} {palaver:?}");
            assert_eq!(resumable(&status), subscription, "subscription resumed on {code:?} {palaver:?}");
        }
    }

    #[test]
    fn a_subscriptions_end_is_judged_as_its_own_stream_status_would_be() {
        let end = |code: &str, grpc: Code| pb::PipelineError {
            code: code.into(),
            grpc_code: grpc as i32,
            message: "x".into(),
            retry_after_ms: 0,
        };
        let kicked = end_status(&end("not_member", Code::FailedPrecondition));
        assert_eq!((describe(&kicked).as_str(), resumable(&kicked)), ("not_member: x", false));
        let slow = end_status(&end("slow_consumer", Code::ResourceExhausted));
        assert_eq!((error_code(&slow).as_str(), resumable(&slow)), ("slow_consumer", true));
        assert!(resumable(&end_status(&end("unavailable", Code::Unavailable))));
    }

    #[test]
    fn rooms_fill_a_stream_to_the_nodes_limit_before_the_next_opens() {
        let mut placement = Placement::default();
        let rooms: Vec<String> = (0..2 * ROOMS_PER_STREAM_MAX + 1).map(|i| format!("r{i}")).collect();
        let streams: Vec<usize> = rooms.iter().map(|room| placement.place(room)).collect();
        assert_eq!(streams[0], 0);
        assert_eq!(streams[ROOMS_PER_STREAM_MAX - 1], 0);
        assert_eq!(streams[ROOMS_PER_STREAM_MAX], 1, "room {} opens a second stream", ROOMS_PER_STREAM_MAX + 1);
        assert_eq!(streams[2 * ROOMS_PER_STREAM_MAX], 2);
        assert_eq!(placement.streams, vec![ROOMS_PER_STREAM_MAX, ROOMS_PER_STREAM_MAX, 1]);
        // Starting a followed room again keeps it where it is.
        assert_eq!(placement.place("r5"), 0);
        assert_eq!(placement.streams[0], ROOMS_PER_STREAM_MAX);
        // A stopped room frees its place on its stream, and the next new room takes it.
        assert_eq!(placement.remove("r5"), Some(0));
        assert_eq!(placement.remove("r5"), None);
        assert_eq!(placement.place("new"), 0);
        assert_eq!(placement.place("newer"), 2);
        assert!(placement.streams.iter().all(|count| *count <= ROOMS_PER_STREAM_MAX));
    }

    #[tokio::test]
    async fn a_call_is_retried_until_it_succeeds_and_no_more_than_the_limit() {
        let mut attempts = 0;
        let result = retry_paced(
            || {
                attempts += 1;
                let done = attempts == 3;
                async move { if done { Ok(attempts) } else { Err(with_code(Code::Unavailable, None)) } }
            },
            1,
        )
        .await;
        assert_eq!(result.ok(), Some(3));
        let mut attempts = 0;
        let result: Result<(), Status> = retry_paced(
            || {
                attempts += 1;
                async { Err(with_code(Code::ResourceExhausted, Some("rate_limited"))) }
            },
            1,
        )
        .await;
        assert!(result.is_err());
        assert_eq!(attempts, CALL_ATTEMPTS_MAX);
        let mut attempts = 0;
        let result: Result<(), Status> = retry_paced(
            || {
                attempts += 1;
                async { Err(with_code(Code::NotFound, Some("room_not_found"))) }
            },
            1,
        )
        .await;
        assert!(result.is_err());
        assert_eq!(attempts, 1, "a refusal is not retried");
    }
}
