//! The WebSocket gateway (`GET /ws`): JSON frames carrying the operations and events of
//! `ChatService` (the protocol is written down in `docs/websocket.md`).
//!
//! One session per connection: a reader loop that parses frames and runs them, a writer task
//! that owns the socket's sending half, and one forwarder task per subscription. Frames that
//! change the session (register, login, authenticate, subscribe, unsubscribe) run in order in
//! the reader loop; everything else runs concurrently (at most [`WS_IN_FLIGHT_MAX`] at once,
//! then the loop stops reading) and is answered by id. Limits: [`super::REQUEST_BYTES_MAX`]
//! per frame (bigger ones get `too_large`; past [`WS_FRAME_BYTES_HARD_MAX`] the connection is
//! closed), [`WS_FRAMES_PER_SECOND`] frames per second per connection, [`WS_SUBSCRIPTIONS_MAX`]
//! subscriptions, connections per address ([`super::HttpOptions`]). Frames to the client wait
//! in a queue of at most [`WS_OUTBOUND_BYTES_MAX`]; a client that leaves it full for
//! [`WS_SLOW_CONSUMER_MS`] is disconnected with `slow_consumer`: memory per connection stays
//! bounded, and the client resumes from its version vectors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
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
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::json::{self, ErrorBody};
use super::{AddressSlot, Gateway};
use crate::dispatch;
use crate::error::{ApiError, ERROR_CODE_METADATA_KEY};
use crate::metrics::Surface;
use crate::ops::TargetAction;

/// Past this size a frame is not read at all: the connection is closed (code 1009).
pub const WS_FRAME_BYTES_HARD_MAX: usize = 1024 * 1024;
/// The read buffer a connection starts with (it grows for larger frames).
pub const WS_READ_BUFFER_BYTES: usize = 8 * 1024;
/// Frames a connection may send per second, sustained.
pub const WS_FRAMES_PER_SECOND: u32 = 100;
/// Frames a connection may send at once.
pub const WS_FRAME_BURST: u32 = 200;
/// Most subscriptions open on one connection.
pub const WS_SUBSCRIPTIONS_MAX: usize = 256;
/// Most frames of one connection running at once.
pub const WS_IN_FLIGHT_MAX: usize = 64;
/// Frames queued to be sent to one connection.
pub const WS_OUTBOUND_FRAMES: usize = 1_024;
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
    subscriptions: HashMap<u64, JoinHandle<()>>,
    /// Subscriptions that ended on their own, to forget.
    ended: mpsc::UnboundedReceiver<u64>,
    ended_tx: mpsc::UnboundedSender<u64>,
    /// Set when something decides that the connection must close.
    closing: watch::Sender<Option<Closing>>,
    in_flight: Arc<Semaphore>,
    limiter: governor::DefaultDirectRateLimiter,
}

/// The sending side of a connection's queue, bounded in frames and bytes. Every sender (the
/// session, running operations, subscriptions) goes through it; the writer task drains it.
#[derive(Debug, Clone)]
struct Outbox {
    frames: mpsc::Sender<(Message, OwnedSemaphorePermit)>,
    bytes: Arc<Semaphore>,
    closing: watch::Sender<Option<Closing>>,
    metrics: crate::metrics::Metrics,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
enum NotSent {
    /// The connection is gone.
    Gone,
    /// The client left the queue full for [`WS_SLOW_CONSUMER_MS`]; the connection closes.
    Slow,
}

impl Outbox {
    /// Queue `message`, waiting at most [`WS_SLOW_CONSUMER_MS`] for room; past that the client
    /// is too slow and the connection is told to close (`why` says what was not read).
    async fn send(&self, message: Message, why: impl FnOnce() -> String) -> Result<(), NotSent> {
        let size = match &message {
            Message::Text(text) => text.len(),
            _ => 0,
        };
        let permits = u32::try_from(size.clamp(1, WS_OUTBOUND_BYTES_MAX)).unwrap_or(u32::MAX);
        let queue = async {
            let permit = self.bytes.clone().acquire_many_owned(permits).await.map_err(|_| NotSent::Gone)?;
            self.frames.send((message, permit)).await.map_err(|_| NotSent::Gone)
        };
        match tokio::time::timeout(Duration::from_millis(WS_SLOW_CONSUMER_MS), queue).await {
            Ok(result) => result,
            Err(_) => {
                if signal_close(&self.closing, CLOSE_SLOW_CONSUMER, ApiError::SlowConsumer(why())) {
                    self.metrics.slow_subscriber_dropped(Surface::Ws);
                }
                Err(NotSent::Slow)
            }
        }
    }
}

/// Ask the session to close with `code` and `error`; the first reason wins (returns whether
/// this one did).
fn signal_close(closing: &watch::Sender<Option<Closing>>, code: u16, error: ApiError) -> bool {
    closing.send_if_modified(|closing| {
        if closing.is_some() {
            return false;
        }
        *closing = Some(Closing { code, error });
        true
    })
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
        let (frames, outbound) = mpsc::channel(WS_OUTBOUND_FRAMES);
        let (closing, closing_rx) = watch::channel(None);
        let metrics = gateway.node.metrics.clone();
        let writer = tokio::spawn(write_frames(sink, outbound, closing.clone(), metrics.clone()));
        let bytes = Arc::new(Semaphore::new(WS_OUTBOUND_BYTES_MAX));
        let out = Outbox { frames, bytes, closing: closing.clone(), metrics };
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let burst = NonZeroU32::new(WS_FRAME_BURST).unwrap_or(NonZeroU32::MIN);
        let rate = NonZeroU32::new(WS_FRAMES_PER_SECOND).unwrap_or(NonZeroU32::MIN);
        let mut session = Session {
            gateway,
            out,
            token,
            subscriptions: HashMap::new(),
            ended,
            ended_tx,
            closing,
            in_flight: Arc::new(Semaphore::new(WS_IN_FLIGHT_MAX)),
            limiter: governor::RateLimiter::direct(governor::Quota::per_second(rate).allow_burst(burst)),
        };
        session.send(session.hello().await).await;
        session.read_frames(stream, closing_rx).await;
        for (_, task) in session.subscriptions.drain() {
            task.abort();
        }
        // Let the writer send what is queued and the close frame, then stop.
        drop(session);
        let _ = tokio::time::timeout(Duration::from_millis(WS_SLOW_CONSUMER_MS), writer).await;
    }

    /// The first frame: which node this is, who the session runs as, and every node's HTTP
    /// address, so that a page can move to another node if this one dies.
    async fn hello(&self) -> Message {
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

    async fn read_frames(
        &mut self,
        mut stream: futures::stream::SplitStream<WebSocket>,
        mut closing: watch::Receiver<Option<Closing>>,
    ) {
        let mut stopped = self.gateway.stopped.clone();
        loop {
            let next = tokio::select! {
                next = stream.next() => next,
                Some(sub) = self.ended.recv() => {
                    self.subscriptions.remove(&sub);
                    continue;
                }
                _ = closing.wait_for(Option::is_some) => return,
                _ = stopped.wait_for(|stop| *stop) => {
                    self.close(1001, ApiError::Unavailable { shard: 0, reason: "the node is stopping".into() });
                    return;
                }
            };
            match next {
                None | Some(Ok(Message::Close(_))) => return,
                Some(Ok(Message::Text(text))) => self.on_text(text.as_str()).await,
                Some(Ok(Message::Binary(_))) => {
                    let error =
                        ApiError::Malformed("binary frames are not part of the protocol; send JSON text".into());
                    self.send(error_frame(None, &error)).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => {
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("too big") {
                        self.close(1009, ApiError::TooLarge { what: "frame".into(), limit: WS_FRAME_BYTES_HARD_MAX });
                    }
                    return;
                }
            }
        }
    }

    fn close(&self, code: u16, error: ApiError) {
        let _ = signal_close(&self.closing, code, error);
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
                let stream = dispatch::subscribe(ops, &user, a.into_pb()?).await?;
                let reply = reply(json::Subscribed { sub: id, room: room.clone() })?;
                // The reply goes out before the first event: the forwarder starts after it.
                self.send(answer_frame(id, Ok(reply))).await;
                let forwarder = Forwarder {
                    sub: id,
                    room,
                    out: self.out.clone(),
                    ended: self.ended_tx.clone(),
                    metrics: self.gateway.node.metrics.clone(),
                };
                self.subscriptions.insert(id, tokio::spawn(forwarder.run(stream)));
                Ok(None)
            }
            "unsubscribe" => {
                let a: json::UnsubscribeArgs = args(a)?;
                let task = self
                    .subscriptions
                    .remove(&a.sub)
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
fn known_op(op: &str) -> &str {
    const OPS: [&str; 20] = [
        "create_room",
        "get_room",
        "list_rooms",
        "update_room",
        "delete_room",
        "join",
        "leave",
        "invite",
        "kick",
        "ban",
        "unban",
        "set_role",
        "post",
        "edit",
        "redact",
        "react",
        "history",
        "set_presence",
        "typing",
        "mark_read",
    ];
    if OPS.contains(&op) { op } else { "unknown" }
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

/// Moves one subscription's events into the connection's queue.
struct Forwarder {
    sub: u64,
    room: String,
    out: Outbox,
    ended: mpsc::UnboundedSender<u64>,
    metrics: crate::metrics::Metrics,
}

impl Forwarder {
    async fn run(self, mut stream: crate::subscribe::EventStream) {
        let end = loop {
            let Some(item) = stream.next().await else {
                break Some(ErrorBody::from(&ApiError::Unavailable {
                    shard: 0,
                    reason: "the subscription's source went away; resubscribe with your version vector".into(),
                }));
            };
            let event = match item {
                Ok(event) => event,
                Err(status) => break Some(status_error(&status)),
            };
            let Some(event) = json::RoomEvent::from_pb(event) else { continue };
            let message = frame(json!({ "type": "event", "sub": self.sub, "room": self.room, "event": event }));
            match self.out.send(message, || format!("events of {} were not read", self.room)).await {
                Ok(()) => {}
                Err(NotSent::Gone) => return,
                // The client does not read: it is disconnected rather than buffered for.
                Err(NotSent::Slow) => return,
            }
        };
        if let Some(error) = end {
            // The subscription's source found it too slow (a node feed's buffer moved on).
            if error.code == "slow_consumer" {
                self.metrics.slow_subscriber_dropped(Surface::Ws);
            }
            let message = frame(json!({ "type": "ended", "sub": self.sub, "room": self.room, "error": error }));
            let _ = self.out.send(message, || format!("the end of {} was not read", self.room)).await;
        }
        let _ = self.ended.send(self.sub);
    }
}

/// Owns the sending half: writes queued frames; when the session decides to close, sends a
/// `closing` frame and the close frame. A write that does not finish within
/// [`WS_SLOW_CONSUMER_MS`] ends the connection.
async fn write_frames(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut outbound: mpsc::Receiver<(Message, OwnedSemaphorePermit)>,
    closing: watch::Sender<Option<Closing>>,
    metrics: crate::metrics::Metrics,
) {
    let mut closing_rx = closing.subscribe();
    let write_deadline = Duration::from_millis(WS_SLOW_CONSUMER_MS);
    loop {
        let message = tokio::select! {
            biased;
            _ = closing_rx.wait_for(Option::is_some) => None,
            message = outbound.recv() => Some(message),
        };
        match message {
            // Every sender is gone: the session ended without a reason to give.
            Some(None) => return close_with(&mut sink, None).await,
            // The permit (the frame's bytes in the queue) is released once the frame is written.
            Some(Some((message, _permit))) => match tokio::time::timeout(write_deadline, sink.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    let error = ApiError::SlowConsumer("the socket did not drain".into());
                    if signal_close(&closing, CLOSE_SLOW_CONSUMER, error) {
                        metrics.slow_subscriber_dropped(Surface::Ws);
                    }
                    return;
                }
            },
            None => {
                let why = closing.borrow().clone();
                return close_with(&mut sink, why).await;
            }
        }
    }
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
