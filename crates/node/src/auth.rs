//! Passwords and login tokens.
//!
//! Passwords are hashed with argon2id (default parameters) and a random salt at the edge; the
//! PHC string travels in the RegisterUser command, so the state machine never hashes.
//!
//! A login token is `v1.<user>.<expires_at_ms>.<mac>` where `mac` is HMAC-SHA256 of the first
//! three parts under the cluster's token secret (created by the first node, committed in the
//! meta group, handed to every node that joins). Any node verifies any token without a
//! round-trip. Non-goals: revocation before expiry, per-device sessions.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use palaver_ids::UserName;
use sha2::Sha256;

use crate::error::ApiError;

/// How long a login token is accepted.
pub const TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Longest token accepted (bounds the work of parsing one).
pub const TOKEN_BYTES_MAX: usize = 256;

const TOKEN_VERSION: &str = "v1";

/// Hash `password` with argon2id and `salt` (at least 16 random bytes).
pub fn hash_password(password: &str, salt: &[u8]) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(salt).map_err(|e| ApiError::Internal(format!("salt: {e}")))?;
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| ApiError::Internal(format!("argon2: {e}")))
}

/// Whether `password` matches the stored PHC string.
pub fn verify_password(password: &str, stored_hash: &str) -> Result<bool, ApiError> {
    let parsed = PasswordHash::new(stored_hash).map_err(|e| ApiError::Internal(format!("stored hash: {e}")))?;
    Ok(argon2::Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// Signs and verifies login tokens with the cluster's secret.
#[derive(Clone)]
pub struct TokenSigner {
    secret: Vec<u8>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

impl TokenSigner {
    /// A signer over `secret`.
    pub fn new(secret: Vec<u8>) -> Self {
        Self { secret }
    }

    fn mac(&self, body: &str) -> Result<Vec<u8>, ApiError> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|e| ApiError::Internal(format!("hmac key: {e}")))?;
        mac.update(body.as_bytes());
        Ok(mac.finalize().into_bytes().to_vec())
    }

    /// A token for `user`, accepted until `expires_at_ms`.
    pub fn sign(&self, user: &UserName, expires_at_ms: u64) -> Result<String, ApiError> {
        let body = format!("{TOKEN_VERSION}.{}.{expires_at_ms}", user.as_str());
        let mac = self.mac(&body)?;
        Ok(format!("{body}.{}", URL_SAFE_NO_PAD.encode(mac)))
    }

    /// The user a token speaks for, if it is well-formed, signed by this cluster and unexpired.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<UserName, ApiError> {
        let bad = |why: &str| ApiError::Unauthenticated(format!("invalid token: {why}"));
        if token.len() > TOKEN_BYTES_MAX {
            return Err(bad("too long"));
        }
        let (body, mac) = token.rsplit_once('.').ok_or_else(|| bad("malformed"))?;
        let mut parts = body.split('.');
        let (Some(version), Some(user), Some(expires), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("malformed"));
        };
        if version != TOKEN_VERSION {
            return Err(bad("unknown version"));
        }
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| bad("malformed signature"))?;
        let mut check =
            Hmac::<Sha256>::new_from_slice(&self.secret).map_err(|e| ApiError::Internal(format!("hmac key: {e}")))?;
        check.update(body.as_bytes());
        check.verify_slice(&mac).map_err(|_| bad("bad signature"))?;
        let expires_at_ms: u64 = expires.parse().map_err(|_| bad("malformed expiry"))?;
        if expires_at_ms <= now_ms {
            return Err(ApiError::Unauthenticated("token expired; log in again".into()));
        }
        Ok(UserName(user.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_when_signed_and_fresh() {
        let signer = TokenSigner::new(b"secret-one".to_vec());
        let token = signer.sign(&UserName::from("alice"), 1_000).expect("sign");
        assert_eq!(signer.verify(&token, 999).expect("fresh"), UserName::from("alice"));
        assert!(matches!(signer.verify(&token, 1_000), Err(ApiError::Unauthenticated(m)) if m.contains("expired")));
        let other = TokenSigner::new(b"secret-two".to_vec());
        assert!(other.verify(&token, 0).is_err(), "another cluster's token");
        let forged = token.replace("alice", "mallory");
        assert!(signer.verify(&forged, 0).is_err(), "edited user");
        for garbage in ["", "v1", "v1.a.b", "v2.alice.5.AAAA", "v1.alice.x.AAAA", "....", &"x".repeat(1000)] {
            assert!(signer.verify(garbage, 0).is_err(), "{garbage:?} must be refused");
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse", &[7u8; 16]).expect("hash");
        assert!(verify_password("correct horse", &hash).expect("verify"));
        assert!(!verify_password("wrong horse", &hash).expect("verify"));
    }
}
