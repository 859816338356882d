//! Client connections to the gRPC server, and the limits on them.
//!
//! Every accepted connection takes a slot of its client's address ([`PerAddress`], at most
//! `--grpc-connections-per-address`). A connection past that limit is still accepted, so that
//! its client learns why: every call on it is answered `limit_reached` (gRPC's
//! `RESOURCE_EXHAUSTED`), and it is closed after [`REFUSED_CONNECTION_GRACE_MS`]. A connection
//! carries at most [`GRPC_SUBSCRIPTIONS_PER_CONNECTION_MAX`] subscriptions at once (below
//! HTTP/2's 200 concurrent streams, so that the client gets a typed refusal rather than a stream
//! that waits).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::error::ApiError;
use crate::limits::{AddressSlot, PerAddress};

/// Default of `--grpc-connections-per-address`.
pub const GRPC_CONNECTIONS_PER_ADDRESS_DEFAULT: usize = 1_024;
/// Most subscriptions open on one gRPC connection.
pub const GRPC_SUBSCRIPTIONS_PER_CONNECTION_MAX: usize = 128;
/// How long a connection past its address's limit stays open to answer `limit_reached`.
pub const REFUSED_CONNECTION_GRACE_MS: u64 = 1_000;

/// What the server knows of a connection; in every request's extensions.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address.
    pub remote: Option<SocketAddr>,
    /// Why every call on this connection is refused (its address had too many).
    pub refused: Option<ApiError>,
    subscriptions: Arc<AtomicUsize>,
}

impl ConnectionInfo {
    /// Count one more subscription on this connection, or refuse past the limit.
    pub fn subscription(&self) -> Result<SubscriptionSlot, ApiError> {
        let taken = self.subscriptions.fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
            (open < GRPC_SUBSCRIPTIONS_PER_CONNECTION_MAX).then_some(open + 1)
        });
        match taken {
            Ok(_) => Ok(SubscriptionSlot(self.subscriptions.clone())),
            Err(_) => Err(ApiError::LimitReached {
                what: "subscriptions on one connection".into(),
                limit: GRPC_SUBSCRIPTIONS_PER_CONNECTION_MAX,
            }),
        }
    }
}

/// One subscription counted on its connection while it lives.
#[derive(Debug)]
pub struct SubscriptionSlot(Arc<AtomicUsize>);

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A stream that holds its subscription's slot.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    _slot: Option<SubscriptionSlot>,
}

impl<S> Counted<S> {
    /// `inner`, holding `slot` until dropped.
    pub fn new(inner: S, slot: Option<SubscriptionSlot>) -> Self {
        Self { inner, _slot: slot }
    }
}

impl<S: futures::Stream + Unpin> futures::Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// An accepted TCP connection of the gRPC server, counted against its client's address.
#[derive(Debug)]
pub struct ClientConnection {
    stream: TcpStream,
    info: ConnectionInfo,
    _slot: Option<AddressSlot>,
    /// For a connection past the limit: when it closes.
    closes: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ClientConnection {
    /// Take `stream`'s slot in `per_address` (or mark it refused).
    pub fn accept(stream: TcpStream, per_address: &PerAddress) -> Self {
        let remote = stream.peer_addr().ok();
        let (slot, refused) = match remote.map(|addr| per_address.take(addr.ip())) {
            Some(Ok(slot)) => (Some(slot), None),
            Some(Err(e)) => (None, Some(e)),
            None => (None, None),
        };
        let closes =
            refused.is_some().then(|| Box::pin(tokio::time::sleep(Duration::from_millis(REFUSED_CONNECTION_GRACE_MS))));
        let info = ConnectionInfo { remote, refused, subscriptions: Arc::default() };
        Self { stream, info, _slot: slot, closes }
    }
}

impl ClientConnection {
    /// Whether the connection is past its address's limit (every call on it is refused).
    pub fn is_refused(&self) -> bool {
        self.info.refused.is_some()
    }
}

impl tonic::transport::server::Connected for ClientConnection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for ClientConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(closes) = this.closes.as_mut()
            && closes.as_mut().poll(cx).is_ready()
        {
            // End of stream: the server closes the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
