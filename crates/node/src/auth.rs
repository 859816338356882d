//! Passwords and login tokens.
//!
//! Passwords are hashed with argon2id (default parameters) and a random salt at the edge; the
//! PHC string travels in the RegisterUser command, so the state machine never hashes. Hashes
//! run on a few threads of their own ([`HashPool`], one per core up to 8), each hashing in 19 MiB
//! of memory it keeps: run on tokio's blocking pool (up to 512 threads), each hash allocating
//! and freeing its own, a login storm left the allocator holding gigabytes.
//!
//! A login token is `v1.<user>.<expires_at_ms>.<mac>` where `mac` is HMAC-SHA256 of the first
//! three parts under the cluster's token secret (created by the first node, committed in the
//! meta group, handed to every node that joins). Any node verifies any token without a
//! round-trip. Non-goals: revocation before expiry, per-device sessions.

use argon2::password_hash::{PasswordHash, SaltString};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use palaver_ids::UserName;
use sha2::Sha256;

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use crate::error::ApiError;

/// How long a login token is accepted.
pub const TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;
/// Longest token accepted (bounds the work of parsing one).
pub const TOKEN_BYTES_MAX: usize = 256;

const TOKEN_VERSION: &str = "v1";

/// Hashes waiting for a thread of the [`HashPool`]; past that, logins and registrations are
/// refused with `rate_limited` until the backlog drains.
pub const HASHES_QUEUED_MAX: usize = 256;
/// Most hashing threads: each keeps its 19 MiB of argon2 memory.
pub const HASH_THREADS_MAX: usize = 8;
/// What a refused login or registration is told to wait.
pub const HASH_RETRY_AFTER_MS: u64 = 1_000;

type HashJob = Box<dyn FnOnce() + Send>;

/// Threads that run password hashes (argon2id), at most one hash per thread at once, so that
/// the memory they use is bounded (19 MiB each) and stays with those threads' allocator arenas.
/// Dropping the pool stops its threads once the queued hashes are done.
#[derive(Debug)]
pub struct HashPool {
    jobs: SyncSender<HashJob>,
}

impl HashPool {
    /// A pool of one thread per core, at most [`HASH_THREADS_MAX`].
    pub fn start() -> Result<Self, String> {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self::with_threads(threads.min(HASH_THREADS_MAX))
    }

    /// A pool of `threads` threads (at least one).
    pub fn with_threads(threads: usize) -> Result<Self, String> {
        let (jobs, queue) = std::sync::mpsc::sync_channel::<HashJob>(HASHES_QUEUED_MAX);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("palaver-hash-{i}"))
                .spawn(move || {
                    loop {
                        // One thread waits on the queue, the others on the lock.
                        let job = crate::lock(&queue).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| format!("cannot start a password hashing thread: {e}"))?;
        }
        Ok(Self { jobs })
    }

    /// Run `work` on a hashing thread; refused with `rate_limited` when
    /// [`HASHES_QUEUED_MAX`] hashes already wait.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: HashJob = Box::new(move || {
            let _ = done.send(work());
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(ApiError::RateLimited { retry_after_ms: HASH_RETRY_AFTER_MS }),
            Err(TrySendError::Disconnected(_)) => return Err(ApiError::Internal("password hashing stopped".into())),
        }
        result.await.map_err(|_| ApiError::Internal("a password hash did not finish".into()))?
    }
}

/// Most argon2 memory a stored hash may ask for (the default is 19 MiB).
const HASH_MEMORY_KIB_MAX: u32 = 256 * 1024;

thread_local! {
    /// The argon2 working memory of this thread, kept between hashes: allocating and freeing
    /// 19 MiB per hash is what made the allocator keep gigabytes.
    static HASH_MEMORY: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn internal<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("{what}: {e}"))
}

/// The raw argon2 output of `password` with `salt` under `params`, in this thread's memory.
fn argon2_output(
    argon2: &argon2::Argon2<'_>,
    params: &argon2::Params,
    password: &str,
    salt: &[u8],
) -> Result<argon2::password_hash::Output, ApiError> {
    if params.m_cost() > HASH_MEMORY_KIB_MAX {
        return Err(ApiError::Internal(format!("argon2 memory {} KiB is above the limit", params.m_cost())));
    }
    let len = params.output_len().unwrap_or(argon2::Params::DEFAULT_OUTPUT_LEN);
    HASH_MEMORY.with_borrow_mut(|memory| {
        if memory.len() < params.block_count() {
            memory.resize(params.block_count(), argon2::Block::default());
        }
        argon2::password_hash::Output::init_with(len, |out| {
            argon2
                .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..params.block_count()])
                .map_err(argon2::password_hash::Error::from)
        })
        .map_err(internal("argon2"))
    })
}

/// Hash `password` with argon2id (default parameters) and `salt` (at least 16 random bytes):
/// its PHC string.
pub fn hash_password(password: &str, salt: &[u8]) -> Result<String, ApiError> {
    let salt = SaltString::encode_b64(salt).map_err(internal("salt"))?;
    let argon2 = argon2::Argon2::default();
    let params = argon2.params().clone();
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(internal("salt"))?;
    let output = argon2_output(&argon2, &params, password, salt_bytes)?;
    let hash = PasswordHash {
        algorithm: argon2::ARGON2ID_IDENT,
        version: Some(argon2::Version::V0x13.into()),
        params: argon2::password_hash::ParamsString::try_from(&params).map_err(internal("params"))?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Whether `password` matches the stored PHC string (compared in constant time).
pub fn verify_password(password: &str, stored_hash: &str) -> Result<bool, ApiError> {
    let parsed = PasswordHash::new(stored_hash).map_err(internal("stored hash"))?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(ApiError::Internal("stored hash has no salt or output".into()));
    };
    let algorithm = argon2::Algorithm::try_from(parsed.algorithm).map_err(internal("stored hash"))?;
    let version = parsed.version.map(argon2::Version::try_from).transpose().map_err(internal("stored hash"))?;
    let params = argon2::Params::try_from(&parsed).map_err(internal("stored hash"))?;
    let argon2 = argon2::Argon2::new(algorithm, version.unwrap_or_default(), params.clone());
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(internal("stored salt"))?;
    let computed = argon2_output(&argon2, &params, password, salt_bytes)?;
    Ok(computed == expected)
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

    #[tokio::test]
    async fn the_hash_pool_runs_hashes_and_refuses_past_its_queue() {
        let pool = HashPool::with_threads(1).expect("pool");
        let hash = pool.run(|| hash_password("correct horse", &[7u8; 16])).await.expect("hash");
        assert!(pool.run(move || verify_password("correct horse", &hash)).await.expect("verify"));
        // Hold the only thread, fill the queue: the next one is refused, typed and retryable.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started, running) = tokio::sync::oneshot::channel::<()>();
        let busy = pool.run(move || {
            let _ = started.send(());
            Ok(hold.recv().is_ok())
        });
        let mut busy = Box::pin(busy);
        assert!(futures::poll!(busy.as_mut()).is_pending());
        running.await.expect("the held job runs");
        let queued: Vec<_> = (0..HASHES_QUEUED_MAX).map(|_| Box::pin(pool.run(|| Ok(())))).collect();
        let mut queued = queued;
        for job in &mut queued {
            assert!(futures::poll!(job.as_mut()).is_pending());
        }
        assert!(matches!(
            pool.run(|| Ok(())).await,
            Err(ApiError::RateLimited { retry_after_ms: HASH_RETRY_AFTER_MS })
        ));
        release.send(()).expect("release");
        assert!(busy.await.expect("held job"));
        for job in queued {
            job.await.expect("queued job");
        }
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("correct horse", &[7u8; 16]).expect("hash");
        assert!(verify_password("correct horse", &hash).expect("verify"));
        assert!(!verify_password("wrong horse", &hash).expect("verify"));
    }

    #[test]
    fn hashes_are_the_argon2_crates_own_phc_strings_both_ways() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let salt = [9u8; 16];
        let ours = hash_password("battery staple", &salt).expect("hash");
        let theirs = argon2::Argon2::default()
            .hash_password(b"battery staple", &SaltString::encode_b64(&salt).expect("salt"))
            .expect("argon2")
            .to_string();
        // Same string, so hashes stored before (and by other tools) verify, and ours verify there.
        assert_eq!(ours, theirs);
        assert!(ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        let parsed = PasswordHash::new(&ours).expect("parse");
        assert!(argon2::Argon2::default().verify_password(b"battery staple", &parsed).is_ok());
        // Other parameters in a stored hash are honoured.
        let params = argon2::Params::new(1024, 1, 1, None).expect("params");
        let small = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(b"battery staple", &SaltString::encode_b64(&salt).expect("salt"))
            .expect("argon2")
            .to_string();
        assert!(verify_password("battery staple", &small).expect("verify"));
        assert!(!verify_password("battery stapler", &small).expect("verify"));
        assert!(verify_password("x", "not a phc string").is_err());
    }
}
