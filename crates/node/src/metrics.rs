//! The node's Prometheus metrics, served at `/metrics` ([`crate::http`]).
//!
//! Two kinds: what the surfaces count as requests happen ([`Metrics`]: requests by surface,
//! operation and result code, latency histograms, WebSocket connections, subscribers ended for
//! being slow), and what is read from the node at each scrape (`NodeCollector`: per shard
//! Raft term, leader, commit and apply lag, CRDT replication lag; subscriptions, feeds, route
//! counters). Encoding is `prometheus-client`'s, in the OpenMetrics text format.

use std::sync::Arc;
use std::time::Instant;

use openraft::async_runtime::WatchReceiver;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::node::NodeInner;

/// The surface a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Surface {
    /// gRPC `ChatService`.
    Grpc,
    /// A WebSocket frame.
    Ws,
    /// An HTTP/JSON route.
    Http,
}

impl Surface {
    fn as_str(self) -> &'static str {
        match self {
            Surface::Grpc => "grpc",
            Surface::Ws => "ws",
            Surface::Http => "http",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    surface: &'static str,
    op: String,
    code: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LatencyLabels {
    surface: &'static str,
    op: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct SurfaceLabels {
    surface: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ShardLabels {
    shard: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PeerLabels {
    shard: String,
    peer: String,
}

fn latency_histogram() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.000_1, 2.0, 17))
}

/// Counters and histograms the surfaces update as requests happen.
#[derive(Debug, Clone)]
pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    connections: Family<SurfaceLabels, Gauge>,
    connections_refused: Family<SurfaceLabels, Counter>,
    slow_dropped: Family<SurfaceLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            connections: Family::default(),
            connections_refused: Family::default(),
            slow_dropped: Family::default(),
        }
    }
}

impl Metrics {
    /// Count one request of `op` on `surface` that ended with `code` (`ok` or an
    /// [`ApiError::code`]) after `started`.
    pub fn observe(&self, surface: Surface, op: &str, code: &str, started: Instant) {
        self.requests
            .get_or_create(&RequestLabels { surface: surface.as_str(), op: op.to_owned(), code: code.to_owned() })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels { surface: surface.as_str(), op: op.to_owned() })
            .observe(started.elapsed().as_secs_f64());
    }

    /// [`Metrics::observe`] for a result.
    pub fn observe_result<T>(&self, surface: Surface, op: &str, result: &Result<T, ApiError>, started: Instant) {
        let code = match result {
            Ok(_) => "ok",
            Err(e) => e.code(),
        };
        self.observe(surface, op, code, started);
    }

    /// A connection of `surface` opened; it counts until the guard drops.
    pub fn connection(&self, surface: Surface) -> ConnectionGuard {
        let gauge = self.connections.get_or_create(&SurfaceLabels { surface: surface.as_str() }).clone();
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// A connection of `surface` was refused (a limit).
    pub fn connection_refused(&self, surface: Surface) {
        self.connections_refused.get_or_create(&SurfaceLabels { surface: surface.as_str() }).inc();
    }

    /// A subscriber on `surface` was ended for not keeping up.
    pub fn slow_subscriber_dropped(&self, surface: Surface) {
        self.slow_dropped.get_or_create(&SurfaceLabels { surface: surface.as_str() }).inc();
    }

    /// Everything, as OpenMetrics text.
    pub fn render(&self, node: &Arc<NodeInner>) -> String {
        let mut registry = Registry::with_prefix("palaver");
        registry.register("requests", "Client requests by surface, operation and result code", self.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Client request latency by surface and operation",
            self.latency.clone(),
        );
        registry.register("connections", "Open client connections by surface", self.connections.clone());
        registry.register(
            "connections_refused",
            "Client connections refused by a limit",
            self.connections_refused.clone(),
        );
        registry.register(
            "slow_subscribers_dropped",
            "Subscriptions ended because the client did not keep up (it resumes from its version vector)",
            self.slow_dropped.clone(),
        );
        registry.register_collector(Box::new(NodeCollector { node: node.clone() }));
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(error = %e, "metrics did not encode");
        }
        text
    }
}

/// Keeps a connection counted in [`Metrics`] while it lives.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The group commit's fsync durations as a Prometheus histogram (in seconds).
#[derive(Debug)]
struct FsyncDurations(palaver_shard::GroupCommitCounts);

impl EncodeMetric for FsyncDurations {
    fn encode(&self, mut encoder: prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error> {
        let counts = &self.0;
        let bounds = palaver_shard::log_store::FSYNC_BUCKETS_US.iter().map(|us| *us as f64 / 1e6);
        let buckets: Vec<(f64, u64)> = bounds.chain([f64::INFINITY]).zip(counts.buckets).collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            counts.micros as f64 / 1e6,
            counts.fsyncs,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}

/// What is read from the node at each scrape.
#[derive(Debug)]
struct NodeCollector {
    node: Arc<NodeInner>,
}

fn gauge_family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(L, i64)],
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
    for (labels, value) in values {
        ConstGauge::new(*value).encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value);
    counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = &self.node;
        let (mut term, mut leader, mut is_leader, mut commit_lag, mut apply_lag, mut crdt_lag) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut received_new, mut received_duplicate) = (0u64, 0u64);
        for replica in node.replicas.all() {
            let received = replica.crdt.received_events();
            received_new = received_new.saturating_add(received.new);
            received_duplicate = received_duplicate.saturating_add(received.duplicate);
            let shard = ShardLabels { shard: replica.shard.0.to_string() };
            let metrics = replica.raft.metrics();
            let metrics = metrics.borrow_watched().clone();
            let last_log = metrics.last_log_index.unwrap_or(0);
            let committed = metrics.local_committed.as_ref().map_or(0, |id| id.index);
            let applied = metrics.last_applied.as_ref().map_or(0, |id| id.index);
            term.push((shard.clone(), int(metrics.current_term)));
            leader.push((shard.clone(), int(metrics.current_leader.unwrap_or(0))));
            is_leader.push((shard.clone(), i64::from(metrics.current_leader == Some(node.id.0))));
            commit_lag.push((shard.clone(), int(last_log.saturating_sub(committed))));
            apply_lag.push((shard.clone(), int(committed.saturating_sub(applied))));
            for (peer, events) in replica.crdt.peer_lag() {
                crdt_lag.push((PeerLabels { shard: shard.shard.clone(), peer: peer.0.to_string() }, int(events)));
            }
        }
        gauge_family(&mut encoder, "shard_term", "Raft term of this node's replica, by shard", &term)?;
        gauge_family(&mut encoder, "shard_leader", "Leader node id as this replica knows it (0: none)", &leader)?;
        gauge_family(&mut encoder, "shard_is_leader", "1 if this node leads the shard", &is_leader)?;
        gauge_family(
            &mut encoder,
            "shard_commit_lag_entries",
            "Raft log entries this replica holds that are not known committed",
            &commit_lag,
        )?;
        gauge_family(
            &mut encoder,
            "shard_apply_lag_entries",
            "Committed Raft log entries this replica has not applied yet",
            &apply_lag,
        )?;
        gauge_family(
            &mut encoder,
            "crdt_replication_lag_events",
            "CRDT events this replica holds that a peer replica is not known to hold",
            &crdt_lag,
        )?;
        counter(
            &mut encoder,
            "crdt_events_received_new",
            "CRDT events peer replicas sent this node that it did not hold yet",
            received_new,
        )?;
        counter(
            &mut encoder,
            "crdt_events_received_duplicate",
            "CRDT events peer replicas sent this node that it already held",
            received_duplicate,
        )?;
        let courier = node.replication.courier_counts();
        counter(
            &mut encoder,
            "crdt_courier_calls",
            "Calls this node's couriers sent (own CRDT changes, many shards per call)",
            courier.calls,
        )?;
        counter(&mut encoder, "crdt_courier_rooms", "Rooms pushed by this node's couriers", courier.rooms)?;
        counter(&mut encoder, "crdt_courier_events", "Events pushed by this node's couriers", courier.events)?;
        counter(
            &mut encoder,
            "crdt_courier_calls_after_stall",
            "Courier calls sent while an earlier call to the same peer waited past the stall time",
            courier.after_stall,
        )?;
        let wal = node.replicas.group_commit().counts();
        counter(
            &mut encoder,
            "wal_fsyncs",
            "WAL fsyncs by the group commit (each makes every write before it durable)",
            wal.fsyncs,
        )?;
        counter(&mut encoder, "wal_fsync_failures", "WAL fsyncs that failed", wal.failed)?;
        counter(
            &mut encoder,
            "wal_fsync_waiters",
            "Raft appends and CRDT writes the WAL fsyncs covered (per fsync: how well writes batch)",
            wal.waiters,
        )?;
        let durations = FsyncDurations(wal);
        durations.encode(encoder.encode_descriptor(
            "wal_fsync_seconds",
            "How long each WAL fsync took",
            None,
            durations.metric_type(),
        )?)?;
        let follows = node.feeds.links.counts();
        counter(
            &mut encoder,
            "feed_upstream_messages",
            "Messages this node's feeds received on their follow streams (many rooms per message)",
            follows.messages,
        )?;
        counter(&mut encoder, "feed_upstream_events", "Events in them", follows.events)?;
        gauge(
            &mut encoder,
            "follow_streams_open",
            "FollowRooms streams this node's feeds use (one per peer, shared by every room followed there)",
            int(node.feeds.links.open() as u64),
        )?;
        gauge(
            &mut encoder,
            "raft_groups_asleep",
            "Local replicas whose Raft timer is stopped: idle groups kept by one beat per node pair",
            int(node.quiesce.asleep_count() as u64),
        )?;
        counter(&mut encoder, "raft_beats_sent", "Beats this node sent its peers", node.quiesce.beats_sent())?;
        counter(
            &mut encoder,
            "raft_leader_silence_wakes",
            "Sleeping groups this node woke because their leader's node stopped beating",
            node.quiesce.silence_wakes(),
        )?;
        gauge(&mut encoder, "subscribers", "Client subscriptions open on this node", int(node.subscription_count()))?;
        gauge(
            &mut encoder,
            "feeds_open",
            "Room feeds this node follows from other nodes",
            int(node.feeds.open() as u64),
        )?;
        let routes = node.directory.counters();
        counter(&mut encoder, "route_cache_hits", "Route lookups the cache answered", routes.cache_hits)?;
        counter(&mut encoder, "route_cache_misses", "Route lookups the cache could not answer", routes.cache_misses)?;
        counter(&mut encoder, "route_corrections", "Routes corrected after a stale answer", routes.corrections)?;
        counter(
            &mut encoder,
            "route_epoch_hints",
            "Routes replaced by a newer record from a replica",
            routes.epoch_hints,
        )?;
        counter(&mut encoder, "route_dht_lookups", "Shard lookups sent to the DHT", routes.dht_lookups)?;
        counter(&mut encoder, "route_dht_found", "DHT lookups that found a valid record", routes.dht_found)?;
        counter(
            &mut encoder,
            "route_meta_fallbacks",
            "Lookups answered from the meta placement",
            routes.meta_fallbacks,
        )?;
        Ok(())
    }
}
