//! The node's error type and its one mapping to gRPC status codes.
//!
//! Every failure a client can meet is an [`ApiError`] variant, named by what the caller should
//! do about it. [`ApiError::code`] is a stable machine-readable string, sent as the gRPC
//! metadata `palaver-error` (and later as the WebSocket error frame's `code`); the status code
//! follows gRPC's conventions. The list is documented in `docs/errors.md`.

use palaver_shard::Refusal;

/// Metadata key that carries [`ApiError::code`] on a gRPC error status.
pub const ERROR_CODE_METADATA_KEY: &str = "palaver-error";
/// Metadata key that carries the wait, in ms, of a `rate_limited` error.
pub const RETRY_AFTER_METADATA_KEY: &str = "retry-after-ms";

/// A failure reported to a client. Serializable: a replica's answer to another node's client
/// carries it unchanged (see [`crate::remote`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum ApiError {
    /// The request is malformed or breaks a limit; fix it before retrying.
    #[error("invalid {field}: {reason}")]
    InvalidInput {
        /// The offending field.
        field: std::borrow::Cow<'static, str>,
        /// What is wrong with it.
        reason: String,
    },
    /// No token, a bad token, an expired token, or a wrong password.
    #[error("{0}")]
    Unauthenticated(String),
    /// The metadata rules refused the command (deterministic: retrying will not help).
    #[error("{0}")]
    Refused(Refusal),
    /// The user does not exist.
    #[error("user {0} does not exist")]
    UserNotFound(String),
    /// The shard has no reachable leader right now; retry with backoff.
    #[error("shard {shard} is unavailable: {reason}")]
    Unavailable {
        /// The shard.
        shard: u32,
        /// Why.
        reason: String,
    },
    /// The node is not part of an initialized cluster yet.
    #[error("this node has not joined a cluster yet")]
    NotReady,
    /// The message does not exist in the room (or has not reached this replica yet).
    #[error("message {0} not found")]
    MessageNotFound(String),
    /// The caller sent too much too fast; retry after `retry_after_ms`.
    #[error("rate limit: retry after {retry_after_ms} ms")]
    RateLimited {
        /// How long to wait before the next attempt.
        retry_after_ms: u64,
    },
    /// The write is durable on the accepting replica but no second replica confirmed it in
    /// time (a partition, or replicas down). It will replicate when they are back; retrying with
    /// the same client message id is safe and never duplicates it.
    #[error("stored on one replica of shard {shard}; quorum not reached in time")]
    QuorumTimeout {
        /// The shard.
        shard: u32,
    },
    /// A WebSocket frame or HTTP body that is not what the protocol allows: not JSON, an
    /// unknown operation, arguments of the wrong shape.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// A frame, body or stream is larger than the node accepts.
    #[error("{what} is larger than {limit} bytes")]
    TooLarge {
        /// What was too large.
        what: std::borrow::Cow<'static, str>,
        /// The limit.
        limit: usize,
    },
    /// A per-connection or per-address limit is reached (connections from one address,
    /// subscriptions on one connection); close something first.
    #[error("limit reached: at most {limit} {what}")]
    LimitReached {
        /// What is limited.
        what: std::borrow::Cow<'static, str>,
        /// The limit.
        limit: usize,
    },
    /// A subscription fell too far behind and was ended; resubscribe from the version vector
    /// held, which misses nothing.
    #[error("subscriber too slow ({0}); resubscribe with your version vector")]
    SlowConsumer(String),
    /// A browser page from another origin tried to open a WebSocket.
    #[error("origin {0} is not allowed")]
    ForbiddenOrigin(String),
    /// A bug or an I/O failure on the node.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A field that breaks a rule.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ApiError::InvalidInput { field: std::borrow::Cow::Borrowed(field), reason: reason.into() }
    }

    /// Whether the same request may succeed later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable { .. }
                | ApiError::NotReady
                | ApiError::RateLimited { .. }
                | ApiError::QuorumTimeout { .. }
                | ApiError::SlowConsumer(_)
        )
    }

    /// The stable machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidInput { .. } => "invalid_input",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::UserNotFound(_) => "user_not_found",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::NotReady => "not_ready",
            ApiError::Internal(_) => "internal",
            ApiError::MessageNotFound(_) => "message_not_found",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::QuorumTimeout { .. } => "quorum_timeout",
            ApiError::Malformed(_) => "malformed",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::LimitReached { .. } => "limit_reached",
            ApiError::SlowConsumer(_) => "slow_consumer",
            ApiError::ForbiddenOrigin(_) => "forbidden_origin",
            ApiError::Refused(refusal) => match refusal {
                Refusal::AlreadyInitialized => "already_initialized",
                Refusal::NotMetaShard => "not_meta_shard",
                Refusal::UserExists(_) => "user_exists",
                Refusal::RoomExists(_) => "room_exists",
                Refusal::RoomNotFound(_) => "room_not_found",
                Refusal::NotMember { .. } => "not_member",
                Refusal::AlreadyMember { .. } => "already_member",
                Refusal::Banned { .. } => "banned",
                Refusal::NotBanned { .. } => "not_banned",
                Refusal::NotInvited { .. } => "not_invited",
                Refusal::PermissionDenied { .. } => "permission_denied",
                Refusal::LastOwner { .. } => "last_owner",
                Refusal::SelfTarget(_) => "self_target",
            },
        }
    }

    /// The HTTP status this error maps to (HTTP routes and WebSocket upgrades).
    pub fn http_status(&self) -> u16 {
        use tonic::Code;
        match self {
            ApiError::TooLarge { .. } => 413,
            ApiError::RateLimited { .. } | ApiError::LimitReached { .. } => 429,
            _ => match self.grpc_code() {
                Code::InvalidArgument | Code::OutOfRange => 400,
                Code::Unauthenticated => 401,
                Code::PermissionDenied => 403,
                Code::NotFound => 404,
                Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => 409,
                Code::ResourceExhausted => 429,
                Code::Unavailable => 503,
                _ => 500,
            },
        }
    }

    /// The gRPC status code this error maps to.
    pub fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            ApiError::InvalidInput { .. } => Code::InvalidArgument,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::UserNotFound(_) => Code::NotFound,
            ApiError::Unavailable { .. } | ApiError::NotReady | ApiError::QuorumTimeout { .. } => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
            ApiError::MessageNotFound(_) => Code::NotFound,
            ApiError::RateLimited { .. } => Code::ResourceExhausted,
            ApiError::Malformed(_) => Code::InvalidArgument,
            ApiError::TooLarge { .. } | ApiError::LimitReached { .. } | ApiError::SlowConsumer(_) => {
                Code::ResourceExhausted
            }
            ApiError::ForbiddenOrigin(_) => Code::PermissionDenied,
            ApiError::Refused(refusal) => match refusal {
                Refusal::UserExists(_) | Refusal::RoomExists(_) | Refusal::AlreadyMember { .. } => Code::AlreadyExists,
                Refusal::RoomNotFound(_) => Code::NotFound,
                Refusal::PermissionDenied { .. } | Refusal::Banned { .. } | Refusal::NotInvited { .. } => {
                    Code::PermissionDenied
                }
                Refusal::AlreadyInitialized
                | Refusal::NotMetaShard
                | Refusal::NotMember { .. }
                | Refusal::NotBanned { .. }
                | Refusal::LastOwner { .. }
                | Refusal::SelfTarget(_) => Code::FailedPrecondition,
            },
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(error: ApiError) -> Self {
        let mut status = tonic::Status::new(error.grpc_code(), error.to_string());
        if let Ok(value) = error.code().parse() {
            status.metadata_mut().insert(ERROR_CODE_METADATA_KEY, value);
        }
        if let ApiError::RateLimited { retry_after_ms } = error
            && let Ok(value) = retry_after_ms.to_string().parse()
        {
            status.metadata_mut().insert(RETRY_AFTER_METADATA_KEY, value);
        }
        status
    }
}

impl From<palaver_shard::StoreError> for ApiError {
    fn from(error: palaver_shard::StoreError) -> Self {
        match error {
            palaver_shard::StoreError::Crdt(e) if e.is_retryable() => {
                ApiError::Unavailable { shard: 0, reason: e.to_string() }
            }
            palaver_shard::StoreError::Closed { shard } => {
                ApiError::Unavailable { shard: shard.0, reason: "the node is shutting down".into() }
            }
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<palaver_shard::StorageError> for ApiError {
    fn from(error: palaver_shard::StorageError) -> Self {
        ApiError::Internal(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row of `code` in docs/errors.md: (gRPC status, HTTP status).
    fn documented(code: &str) -> Option<(String, String)> {
        let doc = include_str!("../../../docs/errors.md");
        doc.lines().find_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            (cells.get(1) == Some(&format!("`{code}`").as_str())).then(|| {
                (cells.get(2).copied().unwrap_or_default().into(), cells.get(3).copied().unwrap_or_default().into())
            })
        })
    }

    #[test]
    fn every_error_is_documented_with_its_statuses() {
        let errors = [
            ApiError::invalid("x", "y"),
            ApiError::Unauthenticated(String::new()),
            ApiError::UserNotFound(String::new()),
            ApiError::Unavailable { shard: 1, reason: String::new() },
            ApiError::NotReady,
            ApiError::MessageNotFound(String::new()),
            ApiError::RateLimited { retry_after_ms: 1 },
            ApiError::QuorumTimeout { shard: 1 },
            ApiError::Malformed(String::new()),
            ApiError::TooLarge { what: "frame".into(), limit: 1 },
            ApiError::LimitReached { what: "x".into(), limit: 1 },
            ApiError::SlowConsumer(String::new()),
            ApiError::ForbiddenOrigin(String::new()),
            ApiError::Internal(String::new()),
        ];
        for error in errors {
            let (grpc, http) =
                documented(error.code()).unwrap_or_else(|| panic!("{} is not in errors.md", error.code()));
            let grpc_name = format!("{:?}", error.grpc_code());
            let snake: String = grpc_name
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_uppercase()).then_some('_');
                    sep.into_iter().chain(std::iter::once(c.to_ascii_uppercase()))
                })
                .collect();
            assert_eq!(grpc, snake, "gRPC status of {}", error.code());
            if http != "—" {
                assert_eq!(http, error.http_status().to_string(), "HTTP status of {}", error.code());
            }
        }
    }
}
