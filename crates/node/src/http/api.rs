//! The HTTP/JSON API under `/api/v1/` for control operations (users, rooms, membership,
//! roles, history, and posting, for scripts), and its OpenAPI document at
//! `/api/v1/openapi.json`, generated from these handlers and the [`json`] types by `utoipa`.
//! Every handler is a thin adapter over [`dispatch`]; errors are [`ErrorResponse`] bodies with
//! the HTTP status of [`ApiError::http_status`].

use std::time::Instant;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use palaver_ids::UserName;
use palaver_proto::v1 as pb;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::Gateway;
use super::json::{self, ErrorBody};
use crate::dispatch;
use crate::error::ApiError;
use crate::metrics::Surface;
use crate::ops::TargetAction;

/// The body of every error response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorResponse {
    /// What went wrong.
    pub error: ErrorBody,
}

/// The caller, from `Authorization: Bearer TOKEN`.
#[derive(Debug)]
pub struct Caller(pub UserName);

impl FromRequestParts<Gateway> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gateway: &Gateway) -> Result<Self, Self::Rejection> {
        Ok(Caller(gateway.ops.authenticate(super::bearer(&parts.headers))?))
    }
}

/// A JSON body; a malformed or over-size one is a typed error.
#[derive(Debug)]
pub struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Gateway> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, gateway: &Gateway) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(request, gateway).await {
            Ok(axum::Json(value)) => Ok(Body(value)),
            Err(JsonRejection::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::TooLarge { what: "request body".into(), limit: super::REQUEST_BYTES_MAX })
            }
            Err(e) => Err(ApiError::Malformed(e.body_text())),
        }
    }
}

/// Query parameters; malformed ones are a typed error.
#[derive(Debug)]
pub struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<Gateway> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gateway: &Gateway) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, gateway).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(e) => Err(ApiError::Malformed(e.body_text())),
        }
    }
}

/// Run `op` and count it in the metrics.
async fn timed<T>(
    gateway: &Gateway,
    op: &'static str,
    call: impl Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let started = Instant::now();
    let result = call.await;
    gateway.node.metrics.observe_result(Surface::Http, op, &result, started);
    result
}

type Reply<T> = Result<axum::Json<T>, ApiError>;

/// The routes under `/api/v1`.
pub fn routes() -> Router<Gateway> {
    Router::new()
        .route("/register", post(register))
        .route("/login", post(login))
        .route("/rooms", get(list_rooms).post(create_room))
        .route("/rooms/{room}", get(get_room).put(update_room).delete(delete_room))
        .route("/rooms/{room}/join", post(join))
        .route("/rooms/{room}/leave", post(leave))
        .route("/rooms/{room}/invite", post(invite))
        .route("/rooms/{room}/kick", post(kick))
        .route("/rooms/{room}/ban", post(ban))
        .route("/rooms/{room}/unban", post(unban))
        .route("/rooms/{room}/role", post(set_role))
        .route("/rooms/{room}/messages", get(history).post(post_message))
        .route("/openapi.json", get(|| async { axum::Json(ApiDoc::openapi()) }))
}

/// Register a user.
#[utoipa::path(post, path = "/api/v1/register", tag = "users", request_body = json::Credentials,
    responses((status = 201, description = "Registered", body = json::UserReply),
              (status = 400, description = "Invalid or malformed input", body = ErrorResponse),
              (status = 409, description = "The name is taken (`user_exists`)", body = ErrorResponse)))]
async fn register(State(gateway): State<Gateway>, Body(args): Body<json::Credentials>) -> Response {
    let call = dispatch::register(&gateway.ops, pb::RegisterRequest { user: args.user, password: args.password });
    match timed(&gateway, "register", call).await {
        Ok(done) => (StatusCode::CREATED, axum::Json(json::UserReply { user: done.user })).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Log in: a token to send as `Authorization: Bearer TOKEN`.
#[utoipa::path(post, path = "/api/v1/login", tag = "users", request_body = json::Credentials,
    responses((status = 200, description = "Logged in", body = json::LoginReply),
              (status = 400, description = "Malformed input", body = ErrorResponse),
              (status = 401, description = "Wrong name or password", body = ErrorResponse)))]
async fn login(State(gateway): State<Gateway>, Body(args): Body<json::Credentials>) -> Reply<json::LoginReply> {
    let user = args.user.clone();
    let call = dispatch::login(&gateway.ops, pb::LoginRequest { user: args.user, password: args.password });
    let done = timed(&gateway, "login", call).await?;
    Ok(axum::Json(json::LoginReply { user, token: done.token, expires_at_ms: done.expires_at_ms }))
}

/// The rooms the caller can see, with unread counts.
#[utoipa::path(get, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = [])),
    responses((status = 200, description = "Rooms", body = json::RoomList),
              (status = 401, description = "No valid token", body = ErrorResponse)))]
async fn list_rooms(State(gateway): State<Gateway>, Caller(user): Caller) -> Reply<json::RoomList> {
    let done = timed(&gateway, "list_rooms", dispatch::list_rooms(&gateway.ops, &user)).await?;
    Ok(axum::Json(done.into()))
}

/// Create a room; the caller becomes its owner.
#[utoipa::path(post, path = "/api/v1/rooms", tag = "rooms", security(("bearer" = [])),
    request_body = json::CreateRoomArgs,
    responses((status = 201, description = "Created", body = json::Room),
              (status = 400, description = "Invalid or malformed input", body = ErrorResponse),
              (status = 401, description = "No valid token", body = ErrorResponse),
              (status = 409, description = "The room exists (`room_exists`)", body = ErrorResponse)))]
async fn create_room(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Body(args): Body<json::CreateRoomArgs>,
) -> Response {
    match timed(&gateway, "create_room", dispatch::create_room(&gateway.ops, &user, args.into())).await {
        Ok(room) => (StatusCode::CREATED, axum::Json(json::Room::from(room))).into_response(),
        Err(e) => e.into_response(),
    }
}

/// A room: settings and members.
#[utoipa::path(get, path = "/api/v1/rooms/{room}", tag = "rooms", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")),
    responses((status = 200, description = "The room", body = json::Room),
              (status = 401, description = "No valid token", body = ErrorResponse),
              (status = 404, description = "No such room", body = ErrorResponse)))]
async fn get_room(State(gateway): State<Gateway>, Caller(user): Caller, Path(room): Path<String>) -> Reply<json::Room> {
    let done = timed(&gateway, "get_room", dispatch::get_room(&gateway.ops, &user, pb::RoomRequest { room })).await?;
    Ok(axum::Json(done.into()))
}

/// Replace a room's settings (admins and owners).
#[utoipa::path(put, path = "/api/v1/rooms/{room}", tag = "rooms", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::RoomSettings,
    responses((status = 200, description = "The room", body = json::Room),
              (status = 400, description = "Invalid or malformed input", body = ErrorResponse),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 404, description = "No such room", body = ErrorResponse)))]
async fn update_room(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::RoomSettings>,
) -> Reply<json::Room> {
    let done = timed(&gateway, "update_room", dispatch::update_room(&gateway.ops, &user, args.into_pb(room))).await?;
    Ok(axum::Json(done.into()))
}

/// Delete a room (owners).
#[utoipa::path(delete, path = "/api/v1/rooms/{room}", tag = "rooms", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")),
    responses((status = 200, description = "Deleted", body = json::Ack),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 404, description = "No such room", body = ErrorResponse)))]
async fn delete_room(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
) -> Reply<json::Ack> {
    let call = dispatch::delete_room(&gateway.ops, &user, pb::RoomRequest { room });
    Ok(axum::Json(timed(&gateway, "delete_room", call).await?.into()))
}

/// Join a room.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/join", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")),
    responses((status = 200, description = "Joined", body = json::Ack),
              (status = 403, description = "Banned or not invited", body = ErrorResponse),
              (status = 404, description = "No such room", body = ErrorResponse),
              (status = 409, description = "Already a member", body = ErrorResponse)))]
async fn join(State(gateway): State<Gateway>, Caller(user): Caller, Path(room): Path<String>) -> Reply<json::Ack> {
    let call = dispatch::join(&gateway.ops, &user, pb::RoomRequest { room });
    Ok(axum::Json(timed(&gateway, "join", call).await?.into()))
}

/// Leave a room.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/leave", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")),
    responses((status = 200, description = "Left", body = json::Ack),
              (status = 404, description = "No such room", body = ErrorResponse),
              (status = 409, description = "Not a member, or the last owner", body = ErrorResponse)))]
async fn leave(State(gateway): State<Gateway>, Caller(user): Caller, Path(room): Path<String>) -> Reply<json::Ack> {
    let call = dispatch::leave(&gateway.ops, &user, pb::RoomRequest { room });
    Ok(axum::Json(timed(&gateway, "leave", call).await?.into()))
}

async fn target(
    gateway: &Gateway,
    user: &UserName,
    op: &'static str,
    action: TargetAction,
    room: String,
    args: json::TargetArgs,
) -> Reply<json::Ack> {
    let request = pb::TargetRequest { room, user: args.user };
    Ok(axum::Json(timed(gateway, op, dispatch::act_on(&gateway.ops, user, action, request)).await?.into()))
}

/// Invite a user (admins and owners; needed to join invite-only rooms).
#[utoipa::path(post, path = "/api/v1/rooms/{room}/invite", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::TargetArgs,
    responses((status = 200, description = "Invited", body = json::Ack),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 404, description = "No such room or user", body = ErrorResponse)))]
async fn invite(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::TargetArgs>,
) -> Reply<json::Ack> {
    target(&gateway, &user, "invite", TargetAction::Invite, room, args).await
}

/// Kick a member (admins and owners, of lower rank).
#[utoipa::path(post, path = "/api/v1/rooms/{room}/kick", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::TargetArgs,
    responses((status = 200, description = "Kicked", body = json::Ack),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 404, description = "No such room or user", body = ErrorResponse),
              (status = 409, description = "Not a member, or oneself", body = ErrorResponse)))]
async fn kick(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::TargetArgs>,
) -> Reply<json::Ack> {
    target(&gateway, &user, "kick", TargetAction::Kick, room, args).await
}

/// Lift a ban.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/unban", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::TargetArgs,
    responses((status = 200, description = "Unbanned", body = json::Ack),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 409, description = "Not banned", body = ErrorResponse)))]
async fn unban(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::TargetArgs>,
) -> Reply<json::Ack> {
    target(&gateway, &user, "unban", TargetAction::Unban, room, args).await
}

/// Ban a user (admins and owners).
#[utoipa::path(post, path = "/api/v1/rooms/{room}/ban", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::BanArgs,
    responses((status = 200, description = "Banned", body = json::Ack),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 404, description = "No such room or user", body = ErrorResponse)))]
async fn ban(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::BanArgs>,
) -> Reply<json::Ack> {
    let request = pb::BanRequest { room, user: args.user, reason: args.reason };
    Ok(axum::Json(timed(&gateway, "ban", dispatch::ban(&gateway.ops, &user, request)).await?.into()))
}

/// Set a member's role.
#[utoipa::path(post, path = "/api/v1/rooms/{room}/role", tag = "membership", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::SetRoleArgs,
    responses((status = 200, description = "Role set", body = json::Ack),
              (status = 400, description = "Malformed input", body = ErrorResponse),
              (status = 403, description = "Not allowed", body = ErrorResponse),
              (status = 409, description = "Not a member, or the last owner", body = ErrorResponse)))]
async fn set_role(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::SetRoleArgs>,
) -> Reply<json::Ack> {
    let request = pb::SetRoleRequest::from(json::SetRoleArgs { room, ..args });
    Ok(axum::Json(timed(&gateway, "set_role", dispatch::set_role(&gateway.ops, &user, request)).await?.into()))
}

/// Query of a history page. Positions are written `wall_ms.logical.replica.counter`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Only messages strictly before this position (`wall_ms.logical.replica.counter`).
    pub before: Option<String>,
    /// Only messages strictly after this position.
    pub after: Option<String>,
    /// At most this many (1 to 500; 50 if left out).
    pub limit: Option<u32>,
    /// Oldest first instead of newest first.
    pub oldest_first: Option<bool>,
}

/// A position written `wall_ms.logical.replica.counter`.
pub fn parse_position(field: &'static str, text: &str) -> Result<json::Position, ApiError> {
    let bad = || ApiError::invalid(field, "must be wall_ms.logical.replica.counter");
    let mut parts = text.split('.');
    let mut next = || parts.next().ok_or_else(bad);
    let position = json::Position {
        wall_ms: next()?.parse().map_err(|_| bad())?,
        logical: next()?.parse().map_err(|_| bad())?,
        replica: next()?.parse().map_err(|_| bad())?,
        counter: next()?.parse().map_err(|_| bad())?,
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(position)
}

/// A page of a room's history (members only, or anyone for public rooms).
#[utoipa::path(get, path = "/api/v1/rooms/{room}/messages", tag = "messages", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id"), HistoryQuery),
    responses((status = 200, description = "A page of messages", body = json::History),
              (status = 400, description = "Invalid query", body = ErrorResponse),
              (status = 404, description = "No such room", body = ErrorResponse),
              (status = 409, description = "Not a member", body = ErrorResponse)))]
async fn history(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Reply<json::History> {
    let args = json::HistoryArgs {
        room,
        before: query.before.as_deref().map(|p| parse_position("before", p)).transpose()?,
        after: query.after.as_deref().map(|p| parse_position("after", p)).transpose()?,
        limit: query.limit,
        oldest_first: query.oldest_first.unwrap_or(false),
    };
    Ok(axum::Json(timed(&gateway, "history", dispatch::history(&gateway.ops, &user, args.into())).await?.into()))
}

/// Post a message (members only).
#[utoipa::path(post, path = "/api/v1/rooms/{room}/messages", tag = "messages", security(("bearer" = [])),
    params(("room" = String, Path, description = "The room id")), request_body = json::PostArgs,
    responses((status = 201, description = "Accepted", body = json::PostReply),
              (status = 400, description = "Invalid or malformed input", body = ErrorResponse),
              (status = 409, description = "Not a member", body = ErrorResponse),
              (status = 429, description = "Rate limited: see `Retry-After`", body = ErrorResponse),
              (status = 503, description = "Not durable on a quorum in time (`quorum_timeout`)", body = ErrorResponse)))]
async fn post_message(
    State(gateway): State<Gateway>,
    Caller(user): Caller,
    Path(room): Path<String>,
    Body(args): Body<json::PostArgs>,
) -> Response {
    let request = pb::PostRequest::from(json::PostArgs { room, ..args });
    match timed(&gateway, "post", dispatch::post(&gateway.ops, &user, request)).await {
        Ok(done) => (StatusCode::CREATED, axum::Json(json::PostReply::from(done))).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug)]
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// The OpenAPI document of `/api/v1/`.
#[derive(OpenApi)]
#[openapi(
    info(title = "palaver HTTP API", description = "Control operations of a palaver node. The same operations, \
        with live events, are on the WebSocket at /ws (docs/websocket.md) and on gRPC (proto/palaver/v1/chat.proto)."),
    paths(register, login, list_rooms, create_room, get_room, update_room, delete_room, join, leave, invite, kick,
        unban, ban, set_role, history, post_message),
    components(schemas(ErrorResponse, ErrorBody)),
    modifiers(&BearerAuth),
    tags((name = "users"), (name = "rooms"), (name = "membership"), (name = "messages"))
)]
#[derive(Debug)]
pub struct ApiDoc;
