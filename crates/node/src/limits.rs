//! Limits on what clients send, checked at the edge before anything reaches a shard.

use crate::error::ApiError;

/// Longest user name, in bytes.
pub const USER_NAME_BYTES_MAX: usize = 32;
/// Shortest password, in bytes.
pub const PASSWORD_BYTES_MIN: usize = 8;
/// Longest password, in bytes.
pub const PASSWORD_BYTES_MAX: usize = 128;
/// Longest room id, in bytes.
pub const ROOM_ID_BYTES_MAX: usize = 64;
/// Longest room title, in bytes.
pub const ROOM_TITLE_BYTES_MAX: usize = 128;
/// Longest room topic, in bytes.
pub const ROOM_TOPIC_BYTES_MAX: usize = 1024;
/// Longest ban reason, in bytes.
pub const BAN_REASON_BYTES_MAX: usize = 512;
/// Largest gRPC message a node decodes from a client.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 64 * 1024;
/// Largest gRPC message between nodes (snapshots travel in one message).
pub const PEER_MESSAGE_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Longest message body, in bytes.
pub const MESSAGE_BODY_BYTES_MAX: usize = 16 * 1024;
/// Longest client message id (the idempotency key of a post), in bytes.
pub const CLIENT_MESSAGE_ID_BYTES_MAX: usize = 64;
/// Longest reaction, in bytes.
pub const REACTION_BYTES_MAX: usize = 32;
/// Most messages in one history page.
pub const HISTORY_PAGE_MESSAGES_MAX: usize = 500;
/// History page size when the client names none.
pub const HISTORY_PAGE_MESSAGES_DEFAULT: usize = 50;
/// Sustained CRDT writes (post, edit, redact, react) per second per user, on one node.
pub const WRITES_PER_SECOND_PER_USER: u64 = 20;
/// Burst of CRDT writes a user may send at once.
pub const WRITE_BURST_PER_USER: u64 = 40;
/// Users a node tracks rate limits for before it forgets idle ones.
pub const RATE_LIMITED_USERS_MAX: usize = 100_000;

const _: () = assert!(PASSWORD_BYTES_MIN < PASSWORD_BYTES_MAX);
const _: () =
    assert!(MESSAGE_BODY_BYTES_MAX + CLIENT_MESSAGE_ID_BYTES_MAX + ROOM_ID_BYTES_MAX < CLIENT_MESSAGE_BYTES_MAX);
const _: () = assert!(HISTORY_PAGE_MESSAGES_DEFAULT <= HISTORY_PAGE_MESSAGES_MAX);
const _: () = assert!(WRITES_PER_SECOND_PER_USER <= WRITE_BURST_PER_USER);
const _: () = assert!(ROOM_TOPIC_BYTES_MAX + ROOM_TITLE_BYTES_MAX + ROOM_ID_BYTES_MAX < CLIENT_MESSAGE_BYTES_MAX);

/// A user name: 1..=32 bytes of ASCII letters, digits, `-`, `_`, `.`.
pub fn user_name(field: &'static str, name: &str) -> Result<palaver_ids::UserName, ApiError> {
    if name.is_empty() || name.len() > USER_NAME_BYTES_MAX {
        return Err(ApiError::invalid(field, format!("must be 1 to {USER_NAME_BYTES_MAX} bytes")));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) {
        return Err(ApiError::invalid(field, "may hold only ASCII letters, digits, '-', '_' and '.'"));
    }
    Ok(palaver_ids::UserName(name.to_owned()))
}

/// A room id: 1..=64 bytes of lowercase ASCII letters, digits, `-`, `_`.
pub fn room_id(name: &str) -> Result<palaver_ids::RoomId, ApiError> {
    if name.is_empty() || name.len() > ROOM_ID_BYTES_MAX {
        return Err(ApiError::invalid("room", format!("must be 1 to {ROOM_ID_BYTES_MAX} bytes")));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_')) {
        return Err(ApiError::invalid("room", "may hold only lowercase ASCII letters, digits, '-' and '_'"));
    }
    Ok(palaver_ids::RoomId(name.to_owned()))
}

/// A password within the length limits.
pub fn password(password: &str) -> Result<(), ApiError> {
    if password.len() < PASSWORD_BYTES_MIN || password.len() > PASSWORD_BYTES_MAX {
        return Err(ApiError::invalid(
            "password",
            format!("must be {PASSWORD_BYTES_MIN} to {PASSWORD_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}

/// Free text no longer than `max` bytes.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<String, ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(field, format!("must be at most {max} bytes")));
    }
    Ok(value.to_owned())
}

/// A message body: 1 to [`MESSAGE_BODY_BYTES_MAX`] bytes.
pub fn body(body: &str) -> Result<String, ApiError> {
    if body.is_empty() || body.len() > MESSAGE_BODY_BYTES_MAX {
        return Err(ApiError::invalid("body", format!("must be 1 to {MESSAGE_BODY_BYTES_MAX} bytes")));
    }
    Ok(body.to_owned())
}

/// A short non-empty token (client message id, reaction) of at most `max` bytes, without
/// control characters.
pub fn token(field: &'static str, value: &str, max: usize) -> Result<String, ApiError> {
    if value.is_empty() || value.len() > max {
        return Err(ApiError::invalid(field, format!("must be 1 to {max} bytes")));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "may not hold control characters"));
    }
    Ok(value.to_owned())
}

/// Per-user token buckets: [`WRITES_PER_SECOND_PER_USER`] sustained, [`WRITE_BURST_PER_USER`]
/// at once. Time comes from the caller (the node's injected clock).
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: std::sync::Mutex<std::collections::BTreeMap<palaver_ids::UserName, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens, in thousandths.
    milli_tokens: u64,
    at_ms: u64,
}

impl RateLimiter {
    /// Take one write from `user`'s bucket at `now_ms`, or say how long to wait.
    pub fn take(&self, user: &palaver_ids::UserName, now_ms: u64) -> Result<(), ApiError> {
        const FULL: u64 = WRITE_BURST_PER_USER * 1_000;
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= RATE_LIMITED_USERS_MAX && !buckets.contains_key(user) {
            // Forget users whose bucket has refilled: they are idle.
            buckets.retain(|_, b| {
                b.milli_tokens + now_ms.saturating_sub(b.at_ms).saturating_mul(WRITES_PER_SECOND_PER_USER) < FULL
            });
        }
        let bucket = buckets.entry(user.clone()).or_insert(Bucket { milli_tokens: FULL, at_ms: now_ms });
        let refill = now_ms.saturating_sub(bucket.at_ms).saturating_mul(WRITES_PER_SECOND_PER_USER);
        bucket.milli_tokens = bucket.milli_tokens.saturating_add(refill).min(FULL);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        if bucket.milli_tokens >= 1_000 {
            bucket.milli_tokens -= 1_000;
            return Ok(());
        }
        let missing = 1_000 - bucket.milli_tokens;
        Err(ApiError::RateLimited { retry_after_ms: missing.div_ceil(WRITES_PER_SECOND_PER_USER).max(1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_allows_a_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::default();
        let ada = palaver_ids::UserName("ada".into());
        for _ in 0..WRITE_BURST_PER_USER {
            limiter.take(&ada, 1_000).expect("within the burst");
        }
        let Err(ApiError::RateLimited { retry_after_ms }) = limiter.take(&ada, 1_000) else {
            panic!("the burst is spent");
        };
        assert_eq!(retry_after_ms, 1_000 / WRITES_PER_SECOND_PER_USER);
        limiter.take(&ada, 1_000 + retry_after_ms).expect("one token refilled");
        limiter.take(&palaver_ids::UserName("bob".into()), 1_000).expect("buckets are per user");
    }

    #[test]
    fn bodies_and_tokens_have_limits() {
        assert!(body("").is_err());
        assert!(body(&"b".repeat(MESSAGE_BODY_BYTES_MAX)).is_ok());
        assert!(body(&"b".repeat(MESSAGE_BODY_BYTES_MAX + 1)).is_err());
        assert!(token("reaction", "", REACTION_BYTES_MAX).is_err());
        assert!(token("reaction", "a\u{7}", REACTION_BYTES_MAX).is_err());
        assert!(token("reaction", &"r".repeat(REACTION_BYTES_MAX + 1), REACTION_BYTES_MAX).is_err());
    }

    #[test]
    fn each_limit_refuses_one_past_it() {
        assert!(user_name("user", &"a".repeat(USER_NAME_BYTES_MAX)).is_ok());
        assert!(user_name("user", &"a".repeat(USER_NAME_BYTES_MAX + 1)).is_err());
        assert!(user_name("user", "").is_err());
        assert!(user_name("user", "a b").is_err());
        assert!(room_id(&"r".repeat(ROOM_ID_BYTES_MAX)).is_ok());
        assert!(room_id(&"r".repeat(ROOM_ID_BYTES_MAX + 1)).is_err());
        assert!(room_id("Upper").is_err());
        assert!(password(&"p".repeat(PASSWORD_BYTES_MIN - 1)).is_err());
        assert!(password(&"p".repeat(PASSWORD_BYTES_MAX + 1)).is_err());
        assert!(text("topic", &"t".repeat(ROOM_TOPIC_BYTES_MAX + 1), ROOM_TOPIC_BYTES_MAX).is_err());
    }
}
