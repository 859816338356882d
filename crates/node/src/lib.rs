//! # palaver-node: a palaver node
//!
//! A node is one process: one RocksDB ([`palaver_shard::RocksEngine`]) holding every shard
//! replica the node runs, the gRPC surfaces clients and peers talk to, and the background work
//! that keeps shard groups where placement wants them. Every node is an equal peer: any node
//! accepts any client call and routes it to the leader of the room's shard.
//!
//! ## Request path
//! client -> [`grpc`] (`ChatService`, unary or `Pipeline`) -> [`dispatch`] -> [`ops`] (validate,
//! authenticate, pick the shard by hashing) -> [`routing`] (to the shard's leader: local, or a
//! forward call on the [`peer`] link, with redirects) -> openraft `client_write` -> the shard's log (fsynced by the node's group-commit
//! thread) -> replicated over [`peer`] links ([`raft_network`]) -> applied by every replica ->
//! outcome back along the same path.
//!
//! ## Modules
//! - [`node`]: [`Node::start`] / [`Node::shutdown`], bootstrap (init or join), background loop.
//! - [`cluster`]: persisted identity, the cluster view, placement reconciliation.
//! - [`replicas`]: the replicas this node runs.
//! - [`routing`], [`query`]: commands and reads to the shard leader.
//! - [`dispatch`]: each client write over protobuf types, shared by unary calls and `Pipeline`.
//! - [`ops`], [`messaging`], [`subscribe`]: client operations, written once for every surface.
//! - [`replication`]: CRDT pushes and anti-entropy between the replicas of each shard.
//! - [`convert`]: protobuf conversions.
//! - [`grpc`]: the tonic services; [`peer`], [`raft_network`]: node-to-node traffic.
//! - [`quiesce`]: idle Raft groups sleep; one beat per node pair stands in for their heartbeats.
//! - [`http`]: the web page, WebSocket gateway, HTTP API, `/metrics`; [`metrics`]: what it
//!   serves.
//! - [`auth`], [`limits`], [`error`]: passwords and tokens, input limits, error codes.
//! - [`env`](mod@env): clock, randomness and dialer, injected.
//!
//! Messages take the CRDT plane instead: client -> [`grpc`] -> [`messaging`] (validate, rate
//! limit, authorize against the local replica's applied membership) -> the local replica's
//! `CrdtStore` (stamp, persist, group-commit fsync) -> acknowledged at `one`, or at `quorum` once
//! [`replication`] has pushed it to a second replica that fsynced it. [`subscribe`] streams a
//! room's durable events to clients from any version vector.
//!
//! Browsers and scripts come in through [`http`] (WebSocket frames, HTTP/JSON routes), which
//! converts JSON to the same protobuf requests and calls the same [`dispatch`] functions;
//! [`metrics`] counts every surface.
//!
//! ## Non-goals (for now)
//! Draining nodes and removing replicas from retired nodes come with their own issue.

pub mod auth;
pub mod cluster;
pub mod connections;
pub mod convert;
pub mod directory;
pub mod dispatch;
pub mod env;
pub mod error;
pub mod feed;
pub mod follow;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod messaging;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod peer;
pub mod query;
pub mod quiesce;
pub mod raft_network;
pub mod remote;
pub mod replicas;
pub mod replication;
pub mod routing;
pub mod subscribe;
pub mod subscribe_rooms;

pub use env::{Clock, Dialer, NodeEnv, SharedRng, SystemClock, TcpDialer};
pub use error::ApiError;
pub use node::{Bootstrap, Node, NodeConfig, NodeError};

/// Lock `mutex`, taking the data of a poisoned one (a panic elsewhere must not stop the node).
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
