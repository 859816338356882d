//! The route cache: what this node last learned about each shard's replicas and leader.
//!
//! Filled from the DHT's shard records and from the answers requests get (a redirect names the
//! leader; an unreachable node is dropped), and consulted before the DHT. A route is replaced
//! only by one of an equal or newer [`ShardEpoch`], so an old record found late never undoes a
//! newer answer; a redirect or a failure edits the route in place (the epoch stays) and a later
//! DHT record corrects it. Counters say how often the cache answered.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use palaver_ids::{NodeId, ShardId};

use crate::records::{ShardEpoch, ShardRecord};

/// Where a shard lives, as far as this node knows.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Route {
    /// Its replicas.
    pub replicas: Vec<NodeId>,
    /// Its leader, if known.
    pub leader: Option<NodeId>,
    /// The epoch of the record the route came from (zero if it came from answers only).
    pub epoch: ShardEpoch,
}

impl From<&ShardRecord> for Route {
    fn from(record: &ShardRecord) -> Self {
        Route { replicas: record.replicas.clone(), leader: record.leader, epoch: record.epoch }
    }
}

/// Counters of route resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouteCounters {
    /// Lookups the cache answered.
    pub cache_hits: u64,
    /// Lookups it could not answer.
    pub cache_misses: u64,
    /// Routes corrected after a stale answer (not leader, node gone).
    pub corrections: u64,
    /// Routes replaced by a newer record a replica answered with (the caller's epoch was old).
    pub epoch_hints: u64,
}

/// Routes by shard.
#[derive(Debug, Default)]
pub struct RouteCache {
    routes: Mutex<BTreeMap<ShardId, Route>>,
    hits: AtomicU64,
    misses: AtomicU64,
    corrections: AtomicU64,
    epoch_hints: AtomicU64,
}

impl RouteCache {
    fn routes(&self) -> std::sync::MutexGuard<'_, BTreeMap<ShardId, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached route of `shard`, counted as a hit or a miss.
    pub fn lookup(&self, shard: ShardId) -> Option<Route> {
        let route = self.routes().get(&shard).cloned();
        let counter = if route.is_some() { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
        route
    }

    /// The cached route of `shard`, not counted.
    pub fn peek(&self, shard: ShardId) -> Option<Route> {
        self.routes().get(&shard).cloned()
    }

    /// Take `route` unless the cache holds a newer one; returns whether it was taken.
    pub fn offer(&self, shard: ShardId, route: Route) -> bool {
        let mut routes = self.routes();
        match routes.get(&shard) {
            Some(held) if held.epoch > route.epoch => false,
            _ => {
                routes.insert(shard, route);
                true
            }
        }
    }

    /// A replica answered with its newer record of `shard`: take it if it is newer than the
    /// cached route (counted as an epoch hint).
    pub fn hint(&self, shard: ShardId, route: Route) -> bool {
        let newer = self.peek(shard).is_none_or(|held| held.epoch < route.epoch);
        if newer && self.offer(shard, route) {
            self.epoch_hints.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// An answer named the leader of `shard` (or said the one we had is not): note it.
    pub fn set_leader(&self, shard: ShardId, leader: Option<NodeId>) {
        let mut routes = self.routes();
        let route = routes.entry(shard).or_default();
        if route.leader != leader {
            if route.leader.is_some() {
                self.corrections.fetch_add(1, Ordering::Relaxed);
            }
            route.leader = leader;
            if let Some(leader) = leader
                && !route.replicas.contains(&leader)
            {
                route.replicas.push(leader);
            }
        }
    }

    /// `node` did not answer for `shard`: stop sending there first.
    pub fn node_failed(&self, shard: ShardId, node: NodeId) {
        let mut routes = self.routes();
        if let Some(route) = routes.get_mut(&shard) {
            if route.leader == Some(node) {
                route.leader = None;
            }
            if let Some(at) = route.replicas.iter().position(|n| *n == node) {
                // Keep it, last: it may be back; the DHT record says whether it still belongs.
                let failed = route.replicas.remove(at);
                route.replicas.push(failed);
                self.corrections.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Drop the route of `shard` (the next lookup goes to the DHT).
    pub fn invalidate(&self, shard: ShardId) {
        if self.routes().remove(&shard).is_some() {
            self.corrections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every cached route.
    pub fn snapshot(&self) -> BTreeMap<ShardId, Route> {
        self.routes().clone()
    }

    /// The counters so far.
    pub fn counters(&self) -> RouteCounters {
        RouteCounters {
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            corrections: self.corrections.load(Ordering::Relaxed),
            epoch_hints: self.epoch_hints.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(term: u64, leader: u64) -> Route {
        Route {
            replicas: vec![NodeId(1), NodeId(2), NodeId(3)],
            leader: Some(NodeId(leader)),
            epoch: ShardEpoch { term, config_index: 1 },
        }
    }

    #[test]
    fn newer_routes_replace_older_ones_never_the_reverse() {
        let cache = RouteCache::default();
        assert!(cache.offer(ShardId(1), route(5, 1)));
        assert!(!cache.offer(ShardId(1), route(4, 2)));
        assert_eq!(cache.peek(ShardId(1)).map(|r| r.leader), Some(Some(NodeId(1))));
        assert!(cache.offer(ShardId(1), route(6, 3)));
        assert_eq!(cache.peek(ShardId(1)).map(|r| r.leader), Some(Some(NodeId(3))));
    }

    #[test]
    fn answers_correct_the_route_and_are_counted() {
        let cache = RouteCache::default();
        assert_eq!(cache.lookup(ShardId(1)), None);
        cache.offer(ShardId(1), route(5, 1));
        cache.node_failed(ShardId(1), NodeId(1));
        let corrected = cache.lookup(ShardId(1)).expect("cached");
        assert_eq!(corrected.leader, None);
        assert_eq!(corrected.replicas, vec![NodeId(2), NodeId(3), NodeId(1)]);
        cache.set_leader(ShardId(1), Some(NodeId(4)));
        assert_eq!(cache.peek(ShardId(1)).map(|r| r.replicas.contains(&NodeId(4))), Some(true));
        let counters = cache.counters();
        assert_eq!((counters.cache_hits, counters.cache_misses), (1, 1));
        assert!(counters.corrections >= 1);
        // A hint replaces only an older route.
        assert!(cache.hint(ShardId(1), route(6, 2)));
        assert!(!cache.hint(ShardId(1), route(6, 3)));
        assert!(!cache.hint(ShardId(1), route(5, 3)));
        assert_eq!(cache.counters().epoch_hints, 1);
        assert_eq!(cache.peek(ShardId(1)).and_then(|r| r.leader), Some(NodeId(2)));
    }
}
