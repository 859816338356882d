//! What a node takes from its environment, injected so that tests and the simulator can
//! replace it: the clock, randomness, and how it dials peers. (How it listens is the
//! `TcpListener` handed to [`crate::Node::start`].)

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use tonic::transport::{Channel, Endpoint};

/// Wall-clock time in milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// Opens gRPC channels to other nodes.
pub trait Dialer: Send + Sync + fmt::Debug + 'static {
    /// A channel to the node serving gRPC at `addr` (`host:port`). It may connect lazily.
    fn channel(&self, addr: &str) -> Result<Channel, String>;
}

/// Time allowed to open a TCP connection to a peer.
pub const PEER_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Time allowed for one peer RPC.
pub const PEER_REQUEST_TIMEOUT_MS: u64 = 5_000;
/// HTTP/2 keepalive ping interval on peer connections: how a link stream to a peer that
/// vanished without a reset (a cut cable, a frozen host) is found dead.
pub const PEER_KEEPALIVE_INTERVAL_MS: u64 = 2_000;
/// A keepalive ping unanswered for this long closes the connection and its link.
pub const PEER_KEEPALIVE_TIMEOUT_MS: u64 = 4_000;

/// Plain TCP (HTTP/2 without TLS), connecting lazily.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("bad peer address {addr}: {e}"))?
            .connect_timeout(Duration::from_millis(PEER_CONNECT_TIMEOUT_MS))
            .timeout(Duration::from_millis(PEER_REQUEST_TIMEOUT_MS))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_millis(PEER_KEEPALIVE_INTERVAL_MS))
            .keep_alive_timeout(Duration::from_millis(PEER_KEEPALIVE_TIMEOUT_MS))
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_lazy())
    }
}

/// A shared source of randomness (salts, token secrets, cluster ids).
#[derive(Clone)]
pub struct SharedRng(Arc<Mutex<rand::rngs::StdRng>>);

impl fmt::Debug for SharedRng {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedRng")
    }
}

impl SharedRng {
    /// Seeded from the operating system.
    pub fn from_os() -> Self {
        Self(Arc::new(Mutex::new(rand::rngs::StdRng::from_os_rng())))
    }

    /// Seeded for reproducible runs.
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(rand::rngs::StdRng::seed_from_u64(seed))))
    }

    /// `n` random bytes.
    pub fn bytes(&self, n: usize) -> Vec<u8> {
        let mut out = vec![0u8; n];
        let mut rng = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        rng.fill_bytes(&mut out);
        out
    }
}

/// Everything a node takes from its environment.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    /// Wall clock.
    pub clock: Arc<dyn Clock>,
    /// Peer dialing.
    pub dialer: Arc<dyn Dialer>,
    /// Randomness.
    pub rng: SharedRng,
}

impl Default for NodeEnv {
    fn default() -> Self {
        Self { clock: Arc::new(SystemClock), dialer: Arc::new(TcpDialer), rng: SharedRng::from_os() }
    }
}
