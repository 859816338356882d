//! The chat client's side of the wire: one gRPC channel to the node named by `--addr`, the
//! login token, the unary calls (idempotent writes retried while the error says a retry can
//! succeed), and one subscription task per joined room.
//!
//! A subscription task keeps the room's version vector and passes each event on once: an event
//! whose dot the vector covers is dropped. When the stream breaks (the node died, the stream was
//! ended `resource_exhausted`, the channel reconnected), the task resubscribes from that vector
//! after a pause that doubles from [`RESUBSCRIBE_BACKOFF_MS_MIN`] to
//! [`RESUBSCRIBE_BACKOFF_MS_MAX`], so the client misses nothing and sees nothing twice. An
//! error that no retry can fix (`not_member`, `room_not_found`, `unauthenticated`, …) ends the
//! task.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use palaver_proto::v1 as pb;
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::room_event::Event;
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

    async fn subscribe(
        &self,
        room: &str,
        have: &BTreeMap<u64, u64>,
    ) -> Result<tonic::Streaming<pb::RoomEvent>, Status> {
        let mut client = self.client.clone();
        let version_vector = pb::VersionVector { entries: have.iter().map(|(r, c)| (*r, *c)).collect() };
        let request =
            self.authed(pb::SubscribeRequest { room: room.to_owned(), version_vector: Some(version_vector) })?;
        match tokio::time::timeout(Duration::from_millis(CALL_TIMEOUT_MS), client.subscribe(request)).await {
            Ok(result) => Ok(result?.into_inner()),
            Err(_) => Err(Status::deadline_exceeded(format!("no subscription within {CALL_TIMEOUT_MS} ms"))),
        }
    }
}

/// The running subscription tasks, one per room; each is aborted and awaited when it stops.
#[derive(Debug, Default)]
pub struct Subscriptions {
    tasks: BTreeMap<String, JoinHandle<()>>,
}

impl Subscriptions {
    /// Subscribe to `room` from the version vector `have` (replacing a running subscription),
    /// passing its events to `out`.
    pub fn start(&mut self, session: &Session, room: &str, have: BTreeMap<u64, u64>, out: &mpsc::Sender<Incoming>) {
        self.stop(room);
        let task = tokio::spawn(follow(session.clone(), room.to_owned(), have, out.clone()));
        self.tasks.insert(room.to_owned(), task);
    }

    /// Stop the subscription to `room`, if any.
    pub fn stop(&mut self, room: &str) {
        if let Some(task) = self.tasks.remove(room) {
            task.abort();
        }
    }

    /// Stop every subscription and wait until their tasks are gone.
    pub async fn shutdown(&mut self) {
        for (_, task) in std::mem::take(&mut self.tasks) {
            task.abort();
            let _ = task.await;
        }
    }
}

/// How one subscription stream ended.
enum StreamEnd {
    /// The client stopped listening.
    Gone,
    /// Broken; resubscribe.
    Broken(Status),
}

/// One room's subscription, resumed from its version vector until it ends for good.
async fn follow(session: Session, room: String, mut have: BTreeMap<u64, u64>, out: mpsc::Sender<Incoming>) {
    let mut pause_ms = RESUBSCRIBE_BACKOFF_MS_MIN;
    loop {
        let catching_up = Incoming::Link { room: room.clone(), link: Link::CatchingUp, error: None };
        if out.send(catching_up).await.is_err() {
            return;
        }
        let status = match session.subscribe(&room, &have).await {
            Ok(stream) => match pass_on(stream, &mut have, &out, &mut pause_ms).await {
                StreamEnd::Gone => return,
                StreamEnd::Broken(status) => status,
            },
            Err(status) => status,
        };
        if !resumable(&status) {
            let _ = out.send(Incoming::Ended { room: room.clone(), reason: describe(&status) }).await;
            return;
        }
        let reconnecting =
            Incoming::Link { room: room.clone(), link: Link::Reconnecting, error: Some(describe(&status)) };
        if out.send(reconnecting).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        pause_ms = (pause_ms * 2).min(RESUBSCRIBE_BACKOFF_MS_MAX);
    }
}

/// Pass a stream's new events on, advancing `have`; a catch-up resets the backoff.
async fn pass_on(
    mut stream: tonic::Streaming<pb::RoomEvent>,
    have: &mut BTreeMap<u64, u64>,
    out: &mpsc::Sender<Incoming>,
    pause_ms: &mut u64,
) -> StreamEnd {
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => return StreamEnd::Broken(Status::unavailable("the node ended the subscription")),
            Err(status) => return StreamEnd::Broken(status),
        };
        match &event.event {
            Some(Event::Message(message)) => {
                let Some(position) = message.position.as_ref() else { continue };
                let held = have.entry(position.replica).or_default();
                if position.counter <= *held {
                    continue;
                }
                *held = position.counter;
            }
            Some(Event::CaughtUp(_)) => *pause_ms = RESUBSCRIBE_BACKOFF_MS_MIN,
            _ => {}
        }
        if out.send(Incoming::Event(Box::new(event))).await.is_err() {
            return StreamEnd::Gone;
        }
    }
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
