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

/// Per-user token buckets (governor's keyed GCRA limiter): [`WRITES_PER_SECOND_PER_USER`]
/// sustained, [`WRITE_BURST_PER_USER`] at once. Time comes from the caller (the node's injected
/// clock), so that a simulated node is limited in simulated time.
#[derive(Debug)]
pub struct RateLimiter {
    limiter: governor::RateLimiter<
        palaver_ids::UserName,
        governor::state::keyed::HashMapStateStore<palaver_ids::UserName>,
        CallerClock,
        governor::middleware::NoOpMiddleware<governor::nanos::Nanos>,
    >,
    clock: CallerClock,
}

/// The latest time a caller passed in, in milliseconds: the limiter's clock.
#[derive(Debug, Clone, Default)]
struct CallerClock(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl CallerClock {
    fn advance_to(&self, now_ms: u64) {
        self.0.fetch_max(now_ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl governor::clock::Clock for CallerClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        std::time::Duration::from_millis(self.0.load(std::sync::atomic::Ordering::Relaxed)).into()
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        let rate = u32::try_from(WRITES_PER_SECOND_PER_USER).ok().and_then(std::num::NonZeroU32::new);
        let burst = u32::try_from(WRITE_BURST_PER_USER).ok().and_then(std::num::NonZeroU32::new);
        let quota = governor::Quota::per_second(rate.unwrap_or(std::num::NonZeroU32::MIN))
            .allow_burst(burst.unwrap_or(std::num::NonZeroU32::MIN));
        let clock = CallerClock::default();
        let limiter = governor::RateLimiter::new(quota, Default::default(), clock.clone());
        Self { limiter, clock }
    }
}

impl RateLimiter {
    /// Take one write from `user`'s bucket at `now_ms`, or say how long to wait.
    pub fn take(&self, user: &palaver_ids::UserName, now_ms: u64) -> Result<(), ApiError> {
        use governor::clock::Clock as _;
        self.clock.advance_to(now_ms);
        if self.limiter.len() >= RATE_LIMITED_USERS_MAX {
            // Forget users whose bucket has refilled: they are idle.
            self.limiter.retain_recent();
        }
        self.limiter.check_key(user).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            ApiError::RateLimited { retry_after_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1) }
        })
    }
}

/// Connections open per client address on one surface, bounded: each connection takes an
/// [`AddressSlot`], which gives its place back when dropped.
#[derive(Debug, Clone)]
pub struct PerAddress {
    limit: usize,
    counts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl PerAddress {
    /// At most `limit` connections per address.
    pub fn new(limit: usize) -> Self {
        Self { limit, counts: Default::default() }
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Take a connection slot for `ip`, or refuse past the limit (`limit_reached`).
    pub fn take(&self, ip: std::net::IpAddr) -> Result<AddressSlot, ApiError> {
        let mut counts = crate::lock(&self.counts);
        let n = counts.entry(ip).or_default();
        if *n >= self.limit {
            if *n == 0 {
                counts.remove(&ip);
            }
            return Err(ApiError::LimitReached { what: "connections from one address".into(), limit: self.limit });
        }
        *n += 1;
        Ok(AddressSlot { counts: self.counts.clone(), ip })
    }
}

/// Counts one connection of an address while it lives.
#[derive(Debug)]
pub struct AddressSlot {
    counts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
    ip: std::net::IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = crate::lock(&self.counts);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
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
    fn connections_per_address_are_counted_and_given_back() {
        let limit = PerAddress::new(2);
        let (a, b) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let first = limit.take(a).expect("first");
        let _second = limit.take(a).expect("second");
        assert!(matches!(limit.take(a), Err(ApiError::LimitReached { limit: 2, .. })));
        let _other = limit.take(b).expect("another address has its own count");
        drop(first);
        let _again = limit.take(a).expect("a closed connection gives its place back");
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
