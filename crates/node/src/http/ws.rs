//! The WebSocket gateway (`GET /ws`): JSON frames carrying the operations and events of
//! `ChatService` (the protocol is written down in `docs/websocket.md`).
//!
//! One session per connection: a reader loop that parses frames and runs them, a writer task
//! that owns the socket's sending half, and one task per subscription, which writes its events
//! straight into the connection's queue (`SubscriptionSink`). Frames that
//! change the session (register, login, authenticate, subscribe, unsubscribe) run in order in
//! the reader loop; everything else runs concurrently (at most [`WS_IN_FLIGHT_MAX`] at once,
//! then the loop stops reading) and is answered by id. Limits: [`super::REQUEST_BYTES_MAX`]
//! per frame (bigger ones get `too_large`; past [`WS_FRAME_BYTES_HARD_MAX`] the connection is
//! closed), [`WS_FRAMES_PER_SECOND`] frames per second per connection, [`WS_SUBSCRIPTIONS_MAX`]
//! subscriptions, connections per address ([`super::HttpOptions`]). Frames to the client wait
//! in a queue of at most [`WS_OUTBOUND_BYTES_MAX`]; a client that leaves it full for
//! [`WS_SLOW_CONSUMER_MS`] is disconnected with `slow_consumer`: memory per connection stays
//! bounded, and the client resumes from its version vectors.
//!
//! An idle connection should cost little memory (see the README's WebSocket figures): the read
//! buffer starts small, handling a frame is boxed (its state exists only while it runs), the
//! queue is a `VecDeque` that allocates only while frames wait, and a subscription is one task.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use governor::clock::Clock;
use palaver_ids::UserName;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;

use super::json::{self, ErrorBody};
use super::{AddressSlot, Gateway};
use crate::dispatch;
use crate::error::{ApiError, ERROR_CODE_METADATA_KEY};
use crate::metrics::Surface;
use crate::ops::TargetAction;
use crate::subscribe::{EventSink, Gone};

/// Past this size a frame is not read at all: the connection is closed (code 1009).
pub const WS_FRAME_BYTES_HARD_MAX: usize = 1024 * 1024;
/// The read buffer a connection starts with (it grows for larger frames).
pub const WS_READ_BUFFER_BYTES: usize = 2 * 1024;
/// Frames a connection may send per second, sustained.
pub const WS_FRAMES_PER_SECOND: u32 = 100;
/// Frames a connection may send at once.
pub const WS_FRAME_BURST: u32 = 200;
/// Most queued frames written with one flush (one system call, unless they pass the socket
/// writer's buffer).
pub const WS_FRAMES_PER_WRITE_MAX: usize = 64;
/// Most subscriptions open on one connection.
pub const WS_SUBSCRIPTIONS_MAX: usize = 256;
/// Most frames of one connection running at once.
pub const WS_IN_FLIGHT_MAX: usize = 64;
/// Frames queued to be sent to one connection.
pub const WS_OUTBOUND_FRAMES: usize = 1_024;
/// Slots an emptied outbound queue keeps (more are given back).
const WS_OUTBOUND_SLOTS_KEPT: usize = 8;
/// Bytes of frames queued to be sent to one connection: what a connection may hold in memory
/// beyond the socket's own buffer, however slowly its client reads.
pub const WS_OUTBOUND_BYTES_MAX: usize = 1024 * 1024;
/// How long a subscription may wait for room in the connection's queue, and a frame for the
/// socket, before the client is disconnected as too slow.
pub const WS_SLOW_CONSUMER_MS: u64 = 10_000;
/// Close code for a slow consumer (private range).
pub const CLOSE_SLOW_CONSUMER: u16 = 4008;

/// The open handshake: origin and per-address checks, then the session.
pub async fn upgrade(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let origin = headers.get(axum::http::header::ORIGIN).and_then(|v| v.to_str().ok());
    if !gateway.origin_allowed(origin, super::host(&headers)) {
        return ApiError::ForbiddenOrigin(origin.unwrap_or_default().to_owned()).into_response();
    }
    // A token in the handshake (programs may send one; browsers cannot) authenticates the
    // session from the start.
    let token = match super::bearer(&headers) {
        Some(token) => match gateway.ops.authenticate(Some(token)) {
            Ok(_) => Some(token.to_owned()),
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let slot = match gateway.address_slot(peer.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            gateway.node.metrics.connection_refused(Surface::Ws);
            return e.into_response();
        }
    };
    upgrade
        // tungstenite reserves its whole read buffer per connection up front (128 KiB by
        // default): most frames are small, and an idle connection should cost little.
        .read_buffer_size(WS_READ_BUFFER_BYTES)
        .max_message_size(WS_FRAME_BYTES_HARD_MAX)
        .max_frame_size(WS_FRAME_BYTES_HARD_MAX)
        .on_upgrade(move |socket| Session::run(gateway, socket, token, slot))
}

/// A frame from the client.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    /// Chosen by the client; the reply carries it back.
    id: u64,
    /// The operation.
    op: String,
    /// Its arguments.
    #[serde(default)]
    args: Value,
}

/// Why the session closes.
#[derive(Debug, Clone)]
struct Closing {
    code: u16,
    error: ApiError,
}

struct Session {
    gateway: Gateway,
    /// Frames to the writer task.
    out: Outbox,
    /// The login token the session runs as.
    token: Option<String>,
    /// Open subscriptions by id (a finished task is a subscription that ended on its own).
    subscriptions: HashMap<u64, JoinHandle<()>>,
    in_flight: Arc<Semaphore>,
    limiter: governor::DefaultDirectRateLimiter,
}

/// A connection's outbound queue, bounded in frames and bytes. Every sender (the session,
/// running operations, subscriptions) goes through it; the writer task drains it.
#[derive(Debug, Clone)]
struct Outbox {
    shared: Arc<OutboxShared>,
    metrics: crate::metrics::Metrics,
}

#[derive(Debug, Default)]
struct OutboxShared {
    state: std::sync::Mutex<Queue>,
    /// Wakes the writer: a frame was queued, or the connection is to close.
    queued: Notify,
    /// Wakes senders waiting for room (a frame was written, or the connection ends).
    room: Notify,
    /// Wakes those waiting for the connection's end (the session's reader, subscriptions).
    ended: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Message>,
    /// Bytes of text in `frames` and being written.
    bytes: usize,
    /// Set when something decides that the connection must close (the first reason wins).
    closing: Option<Closing>,
    /// Set when the session ends: the writer sends what is queued, then the close frame.
    finished: bool,
    /// Set when the writer stopped: nothing more is sent.
    gone: bool,
}

impl Queue {
    /// Whether nothing more may be queued.
    fn closed(&self) -> bool {
        self.gone || self.finished || self.closing.is_some()
    }
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
enum NotSent {
    /// The connection is gone.
    Gone,
    /// The client left the queue full for [`WS_SLOW_CONSUMER_MS`]; the connection closes.
    Slow,
}

fn text_bytes(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        _ => 0,
    }
}

impl Outbox {
    fn new(metrics: crate::metrics::Metrics) -> Self {
        Outbox { shared: Arc::new(OutboxShared::default()), metrics }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Queue> {
        crate::lock(&self.shared.state)
    }

    /// Queue `message`, waiting at most [`WS_SLOW_CONSUMER_MS`] for room; past that the client
    /// is too slow and the connection is told to close (`why` says what was not read).
    async fn send(&self, message: Message, why: impl FnOnce() -> String) -> Result<(), NotSent> {
        let size = text_bytes(&message);
        let mut message = match self.try_push(message, size) {
            Ok(pushed) => return pushed,
            Err(message) => message,
        };
        let mut deadline = None;
        loop {
            // Registered before looking again, so that room made in between is not missed.
            let changed = self.shared.room.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            message = match self.try_push(message, size) {
                Ok(pushed) => return pushed,
                Err(message) => message,
            };
            let at = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_millis(WS_SLOW_CONSUMER_MS));
            if tokio::time::timeout_at(at.into(), changed).await.is_err() {
                if self.close(CLOSE_SLOW_CONSUMER, ApiError::SlowConsumer(why())) {
                    self.metrics.slow_subscriber_dropped(Surface::Ws);
                }
                return Err(NotSent::Slow);
            }
        }
    }

    /// Queue `message` if there is room: `Err` gives it back when there is none.
    fn try_push(&self, message: Message, size: usize) -> Result<Result<(), NotSent>, Message> {
        let mut queue = self.state();
        if queue.closed() {
            return Ok(Err(NotSent::Gone));
        }
        // One frame always fits, however large: the bound is on what waits.
        if !queue.frames.is_empty()
            && (queue.frames.len() >= WS_OUTBOUND_FRAMES || queue.bytes + size > WS_OUTBOUND_BYTES_MAX)
        {
            return Err(message);
        }
        queue.bytes += size;
        queue.frames.push_back(message);
        drop(queue);
        self.shared.queued.notify_one();
        Ok(Ok(()))
    }

    /// Ask the session to close with `code` and `error`; the first reason wins (returns whether
    /// this one did).
    fn close(&self, code: u16, error: ApiError) -> bool {
        let mut queue = self.state();
        if queue.closing.is_some() || queue.gone {
            return false;
        }
        queue.closing = Some(Closing { code, error });
        drop(queue);
        self.wake_all();
        true
    }

    /// Resolves once the connection is to close (`Some`: why), or is gone (`None`).
    async fn ending(&self) -> Option<Closing> {
        loop {
            let ended = self.shared.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            {
                let queue = self.state();
                if queue.closing.is_some() || queue.gone {
                    return queue.closing.clone();
                }
            }
            ended.await;
        }
    }

    fn is_gone(&self) -> bool {
        self.state().closed()
    }

    /// The session ended: the writer sends what is queued and closes.
    fn finish(&self) {
        self.state().finished = true;
        self.wake_all();
    }

    fn wake_all(&self) {
        self.shared.queued.notify_one();
        self.shared.room.notify_waiters();
        self.shared.ended.notify_waiters();
    }

    /// The writer stopped.
    fn set_gone(&self) {
        let mut queue = self.state();
        queue.gone = true;
        queue.frames = VecDeque::new();
        drop(queue);
        self.wake_all();
    }

    /// What the writer does next.
    async fn next_for_writer(&self) -> Next {
        loop {
            if let Some(next) = self.try_next() {
                return next;
            }
            // Registered before looking again, so that a frame queued in between is not missed.
            let queued = self.shared.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            if let Some(next) = self.try_next() {
                return next;
            }
            queued.await;
        }
    }

    fn try_next(&self) -> Option<Next> {
        let mut queue = self.state();
        if let Some(closing) = &queue.closing {
            return Some(Next::Close(Some(closing.clone())));
        }
        if let Some(message) = pop_frame(&mut queue) {
            return Some(Next::Write(message));
        }
        queue.finished.then_some(Next::Close(None))
    }

    /// The next queued frame, if one is queued and the session is not closing.
    fn try_next_frame(&self) -> Option<Message> {
        let mut queue = self.state();
        if queue.closing.is_some() {
            return None;
        }
        pop_frame(&mut queue)
    }

    /// `bytes` of frames were written: room for senders.
    fn written(&self, bytes: usize) {
        let mut queue = self.state();
        queue.bytes = queue.bytes.saturating_sub(bytes);
        drop(queue);
        self.shared.room.notify_waiters();
    }
}

/// The oldest queued frame. An emptied queue gives back what a burst made it grow to: idle
/// connections keep a few slots at most, busy ones do not allocate per frame.
fn pop_frame(queue: &mut Queue) -> Option<Message> {
    let message = queue.frames.pop_front()?;
    if queue.frames.is_empty() && queue.frames.capacity() > WS_OUTBOUND_SLOTS_KEPT {
        queue.frames = VecDeque::new();
    }
    Some(message)
}

/// What the writer does next.
enum Next {
    Write(Message),
    Close(Option<Closing>),
}

fn frame(value: Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}

fn error_frame(id: Option<u64>, error: &ApiError) -> Message {
    frame(json!({ "type": "error", "id": id, "error": ErrorBody::from(error) }))
}

fn args<T: DeserializeOwned>(args: Value) -> Result<T, ApiError> {
    let args = if args.is_null() { Value::Object(serde_json::Map::new()) } else { args };
    serde_json::from_value(args).map_err(|e| ApiError::Malformed(format!("args: {e}")))
}

fn reply<T: serde::Serialize>(value: T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::Internal(format!("reply did not encode: {e}")))
}

/// The error a subscription stream ended with.
fn status_error(status: &tonic::Status) -> ErrorBody {
    let code = status.metadata().get(ERROR_CODE_METADATA_KEY).and_then(|v| v.to_str().ok());
    ErrorBody {
        code: code.unwrap_or("unavailable").to_owned(),
        message: status.message().to_owned(),
        retryable: matches!(code, None | Some("slow_consumer" | "unavailable")),
        retry_after_ms: None,
    }
}

impl Session {
    async fn run(gateway: Gateway, socket: WebSocket, token: Option<String>, slot: AddressSlot) {
        let _slot = slot;
        let _counted = gateway.node.metrics.connection(Surface::Ws);
        let (sink, stream) = socket.split();
        let out = Outbox::new(gateway.node.metrics.clone());
        let writer = tokio::spawn(write_frames(sink, out.clone()));
        let burst = NonZeroU32::new(WS_FRAME_BURST).unwrap_or(NonZeroU32::MIN);
        let rate = NonZeroU32::new(WS_FRAMES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let mut session = Session {
            gateway,
            out,
            token,
            subscriptions: HashMap::new(),
            in_flight: Arc::new(Semaphore::new(WS_IN_FLIGHT_MAX)),
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst)),
        };
        session.send(session.hello()).await;
        session.read_frames(stream).await;
        for (_, task) in session.subscriptions.drain() {
            task.abort();
        }
        // Let the writer send what is queued and the close frame, then stop.
        session.out.finish();
        drop(session);
        let _ = tokio::time::timeout(Duration::from_millis(WS_SLOW_CONSUMER_MS), writer).await;
    }

    /// The first frame: which node this is, who the session runs as, and every node's HTTP
    /// address, so that a page can move to another node if this one dies.
    fn hello(&self) -> Message {
        let node = &self.gateway.node;
        let user = self.token.as_deref().and_then(|t| self.gateway.ops.authenticate(Some(t)).ok());
        let nodes: Vec<Value> = crate::directory::http_addrs(node)
            .into_iter()
            .map(|(id, addr)| json!({ "node": id.0, "http_addr": addr }))
            .collect();
        frame(json!({
            "type": "hello",
            "protocol": 1,
            "node": node.id.0,
            "user": user.map(|u| u.0),
            "nodes": nodes,
            "limits": {
                "frame_bytes": super::REQUEST_BYTES_MAX,
                "frames_per_second": WS_FRAMES_PER_SECOND,
                "frame_burst": WS_FRAME_BURST,
                "subscriptions": WS_SUBSCRIPTIONS_MAX,
                "message_body_bytes": crate::limits::MESSAGE_BODY_BYTES_MAX,
            },
        }))
    }

    async fn read_frames(&mut self, mut stream: futures::stream::SplitStream<WebSocket>) {
        let mut stopped = self.gateway.stopped.clone();
        let out = self.out.clone();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                _ = out.ending() => return,
                _ = stopped.wait_for(|stop| *stop) => {
                    self.close(1001, ApiError::Unavailable { shard: 0, reason: "the node is stopping".into() });
                    return;
                }
            };
            // Boxed: handling a frame needs far more state than waiting for one, and an idle
            // connection should not carry it.
            if Box::pin(self.on_message(next)).await.is_break() {
                return;
            }
        }
    }

    async fn on_message(&mut self, next: Option<Result<Message, axum::Error>>) -> ControlFlow<()> {
        match next {
            None | Some(Ok(Message::Close(_))) => return ControlFlow::Break(()),
            Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => {
                let error = ApiError::Malformed("binary frames are not part of the protocol; send JSON text".into());
                self.send(error_frame(None, &error)).await;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Err(e)) => {
                let text = e.to_string();
                if text.contains("too long") || text.contains("too big") {
                    self.close(1009, ApiError::TooLarge { what: "frame".into(), limit: WS_FRAME_BYTES_HARD_MAX });
                }
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    }

    fn close(&self, code: u16, error: ApiError) {
        let _ = self.out.close(code, error);
    }

    async fn send(&self, message: Message) {
        let _ = self.out.send(message, || "replies were not read".into()).await;
    }

    async fn on_text(&mut self, text: &str) {
        if text.len() > super::REQUEST_BYTES_MAX {
            let id = serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("id").and_then(Value::as_u64));
            let error = ApiError::TooLarge { what: "frame".into(), limit: super::REQUEST_BYTES_MAX };
            return self.send(error_frame(id, &error)).await;
        }
        let frame: Frame = match serde_json::from_str(text) {
            Ok(frame) => frame,
            Err(e) => {
                let id = serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("id").and_then(Value::as_u64));
                let error = ApiError::Malformed(format!("frame: {e}"));
                return self.send(error_frame(id, &error)).await;
            }
        };
        if let Err(not_until) = self.limiter.check() {
            let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
            let retry_after_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            return self.send(error_frame(Some(frame.id), &ApiError::RateLimited { retry_after_ms })).await;
        }
        let started = Instant::now();
        let metrics = self.gateway.node.metrics.clone();
        match frame.op.as_str() {
            // Operations that change the session run in order.
            "register" | "login" | "authenticate" | "subscribe" | "unsubscribe" => {
                let op = frame.op.clone();
                let result = self.session_op(frame.id, &frame.op, frame.args).await;
                metrics.observe_result(Surface::Ws, &op, &result, started);
                match result {
                    Ok(Some(value)) => self.send(answer_frame(frame.id, Ok(value))).await,
                    Ok(None) => {} // answered already
                    Err(error) => self.send(error_frame(Some(frame.id), &error)).await,
                }
            }
            _ => {
                let Ok(permit) = self.in_flight.clone().acquire_owned().await else { return };
                let (gateway, out, token) = (self.gateway.clone(), self.out.clone(), self.token.clone());
                tokio::spawn(async move {
                    let result = match gateway.ops.authenticate(token.as_deref()) {
                        Ok(user) => run(&gateway, &user, &frame.op, frame.args).await,
                        Err(e) => Err(e),
                    };
                    metrics.observe_result(Surface::Ws, known_op(&frame.op), &result, started);
                    let _ = out.send(answer_frame(frame.id, result), || "replies were not read".into()).await;
                    drop(permit);
                });
            }
        }
    }

    /// Run a frame that changes the session; `None`: it was answered already.
    async fn session_op(&mut self, id: u64, op: &str, a: Value) -> Result<Option<Value>, ApiError> {
        let ops = &self.gateway.ops;
        match op {
            "register" => {
                let a: json::Credentials = args(a)?;
                let done =
                    dispatch::register(ops, palaver_proto::v1::RegisterRequest { user: a.user, password: a.password })
                        .await?;
                reply(json::UserReply { user: done.user }).map(Some)
            }
            "login" => {
                let a: json::Credentials = args(a)?;
                let user = a.user.clone();
                let done = dispatch::login(ops, palaver_proto::v1::LoginRequest { user: a.user, password: a.password })
                    .await?;
                self.token = Some(done.token.clone());
                reply(json::LoginReply { user, token: done.token, expires_at_ms: done.expires_at_ms }).map(Some)
            }
            "authenticate" => {
                let a: json::AuthenticateArgs = args(a)?;
                let user = ops.authenticate(Some(&a.token))?;
                self.token = Some(a.token);
                reply(json::UserReply { user: user.0 }).map(Some)
            }
            "subscribe" => {
                let a: json::SubscribeArgs = args(a)?;
                let user = ops.authenticate(self.token.as_deref())?;
                // Forget subscriptions that ended on their own (their `ended` frame is sent).
                self.subscriptions.retain(|_, task| !task.is_finished());
                if self.subscriptions.contains_key(&id) {
                    return Err(ApiError::invalid("id", "a subscription with this id is open"));
                }
                if self.subscriptions.len() >= WS_SUBSCRIPTIONS_MAX {
                    return Err(ApiError::LimitReached {
                        what: "subscriptions on one connection".into(),
                        limit: WS_SUBSCRIPTIONS_MAX,
                    });
                }
                let room = a.room.clone();
                let sink = SubscriptionSink { sub: id, room: room.clone(), out: self.out.clone() };
                let task = dispatch::subscribe_into(ops, &user, a.into_pb()?, sink).await?;
                let reply = reply(json::Subscribed { sub: id, room })?;
                // The reply goes out before the first event: the subscription starts after it.
                self.send(answer_frame(id, Ok(reply))).await;
                self.subscriptions.insert(id, tokio::spawn(task));
                Ok(None)
            }
            "unsubscribe" => {
                let a: json::UnsubscribeArgs = args(a)?;
                let task = self
                    .subscriptions
                    .remove(&a.sub)
                    .filter(|task| !task.is_finished())
                    .ok_or_else(|| ApiError::invalid("sub", "no open subscription has this id"))?;
                task.abort();
                reply(json!({ "sub": a.sub })).map(Some)
            }
            _ => Err(ApiError::Malformed(format!("unknown op {op:?}"))),
        }
    }
}

fn answer_frame(id: u64, result: Result<Value, ApiError>) -> Message {
    match result {
        Ok(result) => frame(json!({ "type": "reply", "id": id, "result": result })),
        Err(error) => error_frame(Some(id), &error),
    }
}

/// The op name as a metrics label: known names only, so that clients cannot grow the label set.
fn known_op(op: &str) -> &'static str {
    dispatch::known_op(op).unwrap_or("unknown")
}

/// Run one stateless operation for `user`.
async fn run(gateway: &Gateway, user: &UserName, op: &str, a: Value) -> Result<Value, ApiError> {
    let ops = &gateway.ops;
    match op {
        "create_room" => {
            reply(json::Room::from(dispatch::create_room(ops, user, args::<json::CreateRoomArgs>(a)?.into()).await?))
        }
        "get_room" => reply(json::Room::from(dispatch::get_room(ops, user, args::<json::RoomArgs>(a)?.into()).await?)),
        "list_rooms" => reply(json::RoomList::from(dispatch::list_rooms(ops, user).await?)),
        "update_room" => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct UpdateArgs {
                room: String,
                #[serde(flatten)]
                settings: json::RoomSettings,
            }
            let a: UpdateArgs = args(a)?;
            reply(json::Room::from(dispatch::update_room(ops, user, a.settings.into_pb(a.room)).await?))
        }
        "delete_room" => {
            reply(json::Ack::from(dispatch::delete_room(ops, user, args::<json::RoomArgs>(a)?.into()).await?))
        }
        "join" => reply(json::Ack::from(dispatch::join(ops, user, args::<json::RoomArgs>(a)?.into()).await?)),
        "leave" => reply(json::Ack::from(dispatch::leave(ops, user, args::<json::RoomArgs>(a)?.into()).await?)),
        "invite" | "kick" | "unban" => {
            let action = match op {
                "invite" => TargetAction::Invite,
                "kick" => TargetAction::Kick,
                _ => TargetAction::Unban,
            };
            reply(json::Ack::from(dispatch::act_on(ops, user, action, args::<json::TargetArgs>(a)?.into()).await?))
        }
        "ban" => reply(json::Ack::from(dispatch::ban(ops, user, args::<json::BanArgs>(a)?.into()).await?)),
        "set_role" => {
            reply(json::Ack::from(dispatch::set_role(ops, user, args::<json::SetRoleArgs>(a)?.into()).await?))
        }
        "post" => reply(json::PostReply::from(dispatch::post(ops, user, args::<json::PostArgs>(a)?.into()).await?)),
        "edit" => reply(json::EventAck::from(dispatch::edit(ops, user, args::<json::EditArgs>(a)?.into()).await?)),
        "redact" => {
            reply(json::EventAck::from(dispatch::redact(ops, user, args::<json::MessageArgs>(a)?.into()).await?))
        }
        "react" => reply(json::EventAck::from(dispatch::react(ops, user, args::<json::ReactArgs>(a)?.into()).await?)),
        "history" => {
            reply(json::History::from(dispatch::history(ops, user, args::<json::HistoryArgs>(a)?.into()).await?))
        }
        "set_presence" => {
            let done = dispatch::set_presence(ops, user, args::<json::SetPresenceArgs>(a)?.into()).await?;
            reply(json::PresenceReply { rooms: done.rooms })
        }
        "typing" => {
            reply(json::EventAck::from(dispatch::typing(ops, user, args::<json::TypingArgs>(a)?.into()).await?))
        }
        "mark_read" => {
            reply(json::EventAck::from(dispatch::mark_read(ops, user, args::<json::MarkReadArgs>(a)?.into()).await?))
        }
        _ => Err(ApiError::Malformed(format!("unknown op {op:?}"))),
    }
}

/// Delivers one subscription's events straight into the connection's queue, as `event` frames,
/// and its end as an `ended` frame: the subscription's own task is all an open subscription
/// costs (no channel, no forwarding task).
struct SubscriptionSink {
    sub: u64,
    room: String,
    out: Outbox,
}

impl SubscriptionSink {
    async fn deliver_frame(&self, event: Result<palaver_proto::v1::RoomEvent, tonic::Status>) -> Result<(), Gone> {
        let message = match event {
            Ok(event) => {
                let Some(event) = json::RoomEvent::from_pb(event) else { return Ok(()) };
                frame(json!({ "type": "event", "sub": self.sub, "room": self.room, "event": event }))
            }
            Err(status) => {
                let error = status_error(&status);
                // The subscription's source found it too slow (a node feed's buffer moved on).
                if error.code == "slow_consumer" {
                    self.out.metrics.slow_subscriber_dropped(Surface::Ws);
                }
                frame(json!({ "type": "ended", "sub": self.sub, "room": self.room, "error": error }))
            }
        };
        // A client that does not read is disconnected rather than buffered for.
        self.out.send(message, || format!("events of {} were not read", self.room)).await.map_err(|_| Gone)
    }
}

impl EventSink for SubscriptionSink {
    async fn deliver(&self, event: Result<palaver_proto::v1::RoomEvent, tonic::Status>) -> Result<(), Gone> {
        // Boxed: the subscription's task waits far more often than it delivers.
        Box::pin(self.deliver_frame(event)).await
    }

    async fn closed(&self) {
        let _ = self.out.ending().await;
    }

    fn is_closed(&self) -> bool {
        self.out.is_gone()
    }
}

/// Owns the sending half: writes queued frames; when the session decides to close, sends a
/// `closing` frame and the close frame. A write that does not finish within
/// [`WS_SLOW_CONSUMER_MS`] ends the connection.
async fn write_frames(mut sink: futures::stream::SplitSink<WebSocket, Message>, out: Outbox) {
    let write_deadline = Duration::from_millis(WS_SLOW_CONSUMER_MS);
    loop {
        match out.next_for_writer().await {
            Next::Write(message) => {
                match tokio::time::timeout(write_deadline, write_batch(&mut sink, &out, message)).await {
                    Ok(Ok(size)) => out.written(size),
                    Ok(Err(_)) => break,
                    Err(_) => {
                        let error = ApiError::SlowConsumer("the socket did not drain".into());
                        if out.close(CLOSE_SLOW_CONSUMER, error) {
                            out.metrics.slow_subscriber_dropped(Surface::Ws);
                        }
                        break;
                    }
                }
            }
            Next::Close(why) => {
                close_with(&mut sink, why).await;
                break;
            }
        }
    }
    out.set_gone();
}

/// Write `first` and the frames queued behind it (at most [`WS_FRAMES_PER_WRITE_MAX`]) with
/// one flush, so that frames that were ready together leave in one system call; the bytes
/// written.
async fn write_batch<S: futures::Sink<Message> + Unpin>(
    sink: &mut S,
    out: &Outbox,
    first: Message,
) -> Result<usize, S::Error> {
    let mut size = text_bytes(&first);
    sink.feed(first).await?;
    for _ in 1..WS_FRAMES_PER_WRITE_MAX {
        let Some(message) = out.try_next_frame() else { break };
        size += text_bytes(&message);
        sink.feed(message).await?;
    }
    sink.flush().await?;
    Ok(size)
}

async fn close_with(sink: &mut futures::stream::SplitSink<WebSocket, Message>, why: Option<Closing>) {
    let deadline = Duration::from_millis(WS_SLOW_CONSUMER_MS);
    let close = match why {
        Some(why) => {
            // The closing frame says why in full; the close frame's reason is the stable code.
            let closing = frame(json!({ "type": "closing", "error": ErrorBody::from(&why.error) }));
            let _ = tokio::time::timeout(deadline, sink.send(closing)).await;
            Some(CloseFrame { code: why.code, reason: Utf8Bytes::from(why.error.code()) })
        }
        None => None,
    };
    let _ = tokio::time::timeout(deadline, sink.send(Message::Close(close))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Message {
        Message::Text(Utf8Bytes::from("x".repeat(n)))
    }

    async fn written(out: &Outbox) -> usize {
        match out.next_for_writer().await {
            Next::Write(message) => {
                let size = text_bytes(&message);
                out.written(size);
                size
            }
            Next::Close(_) => panic!("the writer was told to close"),
        }
    }

    /// A sink that records what it was given and how often it was flushed.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<Message>,
        flushes: usize,
    }

    impl futures::Sink<Message> for Recorder {
        type Error = std::convert::Infallible;

        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn start_send(mut self: std::pin::Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.frames.push(item);
            Ok(())
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.flushes += 1;
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_close(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn frames_queued_together_leave_with_one_flush_and_a_close_waits_for_its_turn() {
        let out = Outbox::new(crate::metrics::Metrics::default());
        for n in 1..=WS_FRAMES_PER_WRITE_MAX + 2 {
            assert_eq!(out.send(text(n), String::new).await, Ok(()));
        }
        let mut sink = Recorder::default();
        let Next::Write(first) = out.next_for_writer().await else { panic!("a frame is queued") };
        let size = write_batch(&mut sink, &out, first).await.expect("written");
        assert_eq!((sink.frames.len(), sink.flushes), (WS_FRAMES_PER_WRITE_MAX, 1));
        assert_eq!(size, (1..=WS_FRAMES_PER_WRITE_MAX).sum::<usize>());
        // The rest is the next batch; a close decided meanwhile is not written within it.
        let Next::Write(next) = out.next_for_writer().await else { panic!("two frames are left") };
        assert!(out.close(CLOSE_SLOW_CONSUMER, ApiError::SlowConsumer("test".into())));
        write_batch(&mut sink, &out, next).await.expect("written");
        assert_eq!((sink.frames.len(), sink.flushes), (WS_FRAMES_PER_WRITE_MAX + 1, 2));
        assert!(matches!(out.next_for_writer().await, Next::Close(Some(_))));
    }

    #[tokio::test]
    async fn a_full_queue_holds_senders_until_the_writer_makes_room() {
        let out = Outbox::new(crate::metrics::Metrics::default());
        // Bytes: a frame that does not fit beside what waits, waits.
        let half = WS_OUTBOUND_BYTES_MAX / 2 + 1;
        assert_eq!(out.send(text(half), String::new).await, Ok(()));
        let sender = out.clone();
        let waiting = tokio::spawn(async move { sender.send(text(half), String::new).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the second frame must wait for room");
        assert_eq!(written(&out).await, half);
        assert_eq!(waiting.await.ok(), Some(Ok(())));
        assert_eq!(written(&out).await, half);
        // Frames: the count is bounded too.
        for _ in 0..WS_OUTBOUND_FRAMES {
            assert_eq!(out.send(text(1), String::new).await, Ok(()));
        }
        let sender = out.clone();
        let waiting = tokio::spawn(async move { sender.send(text(1), String::new).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "frame {} must wait for room", WS_OUTBOUND_FRAMES + 1);
        written(&out).await;
        assert_eq!(waiting.await.ok(), Some(Ok(())));
    }

    #[tokio::test]
    async fn a_finished_session_is_drained_then_closed_and_a_gone_writer_refuses_frames() {
        let out = Outbox::new(crate::metrics::Metrics::default());
        assert_eq!(out.send(text(3), String::new).await, Ok(()));
        out.finish();
        assert_eq!(out.send(text(3), String::new).await, Err(NotSent::Gone));
        assert_eq!(written(&out).await, 3);
        assert!(matches!(out.next_for_writer().await, Next::Close(None)));
        out.set_gone();
        assert!(out.is_gone());
        assert_eq!(out.send(text(3), String::new).await, Err(NotSent::Gone));
    }

    #[tokio::test]
    async fn the_first_reason_to_close_wins_and_ends_waiters() {
        let out = Outbox::new(crate::metrics::Metrics::default());
        assert_eq!(out.send(text(3), String::new).await, Ok(()));
        let watcher = out.clone();
        let ending = tokio::spawn(async move { watcher.ending().await.map(|closing| closing.code) });
        assert!(out.close(CLOSE_SLOW_CONSUMER, ApiError::SlowConsumer("test".into())));
        assert!(!out.close(1001, ApiError::Internal("later".into())));
        assert_eq!(ending.await.ok(), Some(Some(CLOSE_SLOW_CONSUMER)));
        // The close goes out before what is still queued.
        assert!(matches!(out.next_for_writer().await, Next::Close(Some(Closing { code: CLOSE_SLOW_CONSUMER, .. }))));
    }
}
