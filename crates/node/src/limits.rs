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

const _: () = assert!(PASSWORD_BYTES_MIN < PASSWORD_BYTES_MAX);
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

#[cfg(test)]
mod tests {
    use super::*;

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
