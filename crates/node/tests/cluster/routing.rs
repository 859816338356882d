//! The routing plane on real processes: five nodes, clients attached to nodes that hold no
//! replica of their room, nodes found through the DHT, stale routes, a lost meta leader, and
//! records that must not change routing.

use std::collections::BTreeSet;

use palaver_ids::RoomId;
use palaver_ids::{NodeId, ShardId};
use palaver_proto::v1::{
    AckLevel, CreateRoomRequest, EditRequest, HistoryRequest, ReactRequest, RoomEvent, RoomRequest, RoomSubscription,
    StatusResponse, SubscribeRequest, SubscribeRoomsRequest, TypingRequest, VersionVector, room_event,
};
use palaver_router::{Dht, DhtConfig, Entry, RecordKey, RecordSeal, ShardEpoch, ShardRecord, ShardRing};

use crate::harness::{TestCluster, authed, code, next_event, post, user, wait_for};

const SHARDS: u32 = 8;

/// A room name (`<prefix>-<n>`) whose shard has no replica on node `i`, and that shard.
fn room_not_on(cluster: &TestCluster, status: &StatusResponse, i: usize, prefix: &str) -> (String, u32) {
    let ring = ShardRing::new(SHARDS);
    let node_id = status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[i].addr).expect("node").node_id;
    (0..1000)
        .map(|n| format!("{prefix}-{n}"))
        .find_map(|room| {
            let shard = ring.shard_of_room(&RoomId(room.clone())).0;
            let voters = &status.shards.iter().find(|s| s.shard == shard)?.voters;
            (!voters.contains(&node_id)).then_some((room, shard))
        })
        .expect("some room lives elsewhere")
}

/// Indexes of the nodes that hold no replica of `shard`.
fn non_replicas(cluster: &TestCluster, status: &StatusResponse, shard: u32) -> Vec<usize> {
    let voters = &status.shards.iter().find(|s| s.shard == shard).expect("shard").voters;
    status.nodes.iter().filter(|n| !voters.contains(&n.node_id)).map(|n| cluster.index_of(status, n.node_id)).collect()
}

/// The next message event of `stream`, checked to extend `version_vector` by exactly one dot
/// (nothing twice, nothing skipped).
async fn next_message(
    stream: &mut tonic::Streaming<RoomEvent>,
    version_vector: &mut std::collections::BTreeMap<u64, u64>,
) -> palaver_proto::v1::MessageEvent {
    loop {
        if let Some(room_event::Event::Message(message)) = next_event(stream).await.event {
            let position = message.position.expect("position");
            let held = version_vector.entry(position.replica).or_default();
            assert_eq!(position.counter, *held + 1, "each replica's events once, in order");
            *held = position.counter;
            return message;
        }
    }
}

/// Message events (message id, body) read until `count` arrived, each dot once and in order.
async fn read_messages(
    stream: &mut tonic::Streaming<RoomEvent>,
    version_vector: &mut std::collections::BTreeMap<u64, u64>,
    count: usize,
) -> Vec<String> {
    let mut bodies = Vec::new();
    while bodies.len() < count {
        let message = next_message(stream, version_vector).await;
        if message.kind == palaver_proto::v1::MessageEventKind::Posted as i32 {
            bodies.push(message.message.expect("message").body);
        }
    }
    bodies
}

/// The value of `palaver_<name>` (a gauge, or a counter's `_total`) in node `i`'s `/metrics`.
async fn metric(cluster: &TestCluster, i: usize, name: &str) -> u64 {
    let url = format!("http://{}/metrics", cluster.nodes[i].http);
    let text = reqwest::get(url).await.expect("metrics").text().await.expect("metrics text");
    let (gauge, counter) = (format!("palaver_{name} "), format!("palaver_{name}_total "));
    text.lines()
        .find_map(|line| line.strip_prefix(&gauge).or_else(|| line.strip_prefix(&counter)))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

async fn routes_of(cluster: &TestCluster, i: usize) -> palaver_proto::v1::RouteCounters {
    cluster.status_from(i).await.routes.expect("route counters")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_serve_a_room_from_nodes_that_hold_none_of_it() {
    let mut cluster = TestCluster::start(5, SHARDS, &[]).await;
    let status = cluster.status().await.expect("status");
    for node in &status.nodes {
        assert_eq!(node.dht_peers.len(), 4, "node {} found every other node in the DHT", node.node_id);
    }
    // Left alone, every replica sleeps, the copies left on nodes a shard moved away from too.
    cluster.wait_asleep(None).await;
    // Prefer a room whose shard left a copy on a node when it moved there and on (nodes joined
    // one by one): that node must not serve the room from its stale copy.
    let retired = (0..1000).map(|n| format!("far-{n}")).find_map(|room| {
        let shard = ShardRing::new(SHARDS).shard_of_room(&RoomId(room.clone())).0;
        let entry = status.shards.iter().find(|s| s.shard == shard)?;
        let stale = entry.replicas.iter().find(|r| !entry.voters.contains(&r.node_id))?;
        Some((room, shard, cluster.index_of(&status, stale.node_id)))
    });
    let (room, shard, e) = match retired {
        Some(found) => found,
        None => {
            let (room, shard) = room_not_on(&cluster, &status, 0, "far");
            (room, shard, 0)
        }
    };
    let outside = non_replicas(&cluster, &status, shard);
    assert_eq!(outside.len(), 2);
    assert!(outside.contains(&e));
    let f = outside.iter().copied().find(|i| *i != e).expect("a second node without the room");

    // Records nobody in the cluster sealed: a forged leader for the room's shard, a malformed
    // value, a forged address for one of its replicas. Put from a swarm of the test's own.
    let intruder = Dht::start(DhtConfig {
        keypair: libp2p::identity::Keypair::generate_ed25519(),
        listen: "/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr"),
        seal: None,
        agent: "intruder".into(),
    })
    .await
    .expect("intruder swarm");
    let target = status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[e].addr).expect("node");
    intruder.dial(target.p2p_addrs[0].parse().expect("multiaddr")).await.expect("dial a node");
    let forger = RecordSeal::new(b"not the cluster secret");
    let key = RecordKey::Shard(ShardId(shard));
    let forged = Entry::Shard(ShardRecord {
        cluster_id: status.cluster_id.clone(),
        shard: ShardId(shard),
        replicas: vec![NodeId(90), NodeId(91), NodeId(92)],
        leader: Some(NodeId(90)),
        epoch: ShardEpoch { term: 1_000_000, config_index: 1_000_000 },
    });
    intruder.put(key.to_bytes(), forger.seal(&key, &forged)).await.expect("put forged");
    intruder.put(RecordKey::Shard(ShardId(0)).to_bytes(), b"\x00garbage".to_vec()).await.expect("put malformed");

    // A client on node e does everything: create, join, post, edit, react, history, typing,
    // subscribe.
    let mut at_e = cluster.chat(e);
    let ada = user(&mut at_e, "ada").await;
    let bob = user(&mut at_e, "bob").await;
    at_e.create_room(authed(CreateRoomRequest { room: room.clone(), ..Default::default() }, &ada))
        .await
        .expect("create on a non-replica node");
    at_e.join(authed(RoomRequest { room: room.clone() }, &bob)).await.expect("join on a non-replica node");
    let request = SubscribeRequest { room: room.clone(), version_vector: None };
    let mut stream = at_e.subscribe(authed(request, &bob)).await.expect("subscribe on a non-replica node").into_inner();
    let mut version_vector = std::collections::BTreeMap::new();
    let mut ids = Vec::new();
    for i in 0..2 {
        ids.push(post(&mut at_e, &ada, &room, &format!("far-{i}"), AckLevel::Quorum).await.expect("post"));
    }
    // A post through a node that does hold the room reaches the subscriber on e as well (e
    // follows the room's current replicas, not some copy of its own).
    let replica = (0..cluster.nodes.len()).find(|i| !outside.contains(i)).expect("a replica");
    ids.push(post(&mut cluster.chat(replica), &ada, &room, "far-2", AckLevel::Quorum).await.expect("post"));
    // Each once; live events come in the order the followed replica got them, which for posts
    // written on different replicas need not be the posting order (history has the total order).
    let mut sorted = read_messages(&mut stream, &mut version_vector, 3).await;
    sorted.sort();
    assert_eq!(sorted, ["far-0", "far-1", "far-2"]);
    // A second subscriber of the room on e, on a SubscribeRooms stream, shares e's one feed of
    // it.
    let (control, requests) = tokio::sync::mpsc::channel(1);
    let start = RoomSubscription { id: 7, room: room.clone(), version_vector: None };
    control.send(SubscribeRoomsRequest { start: vec![start], stop: Vec::new() }).await.expect("send");
    let mut second = at_e
        .subscribe_rooms(authed(tokio_stream::wrappers::ReceiverStream::new(requests), &ada))
        .await
        .expect("second subscriber")
        .into_inner();
    let mut held = crate::subscribe_rooms::Held::default();
    held.read_until(&mut second, "the room's posts on e", |held| held.sorted(7).len() == 3).await;
    assert_eq!(held.sorted(7), sorted);
    let e_status = cluster.status_from(e).await;
    let e_node = e_status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[e].addr).expect("node e");
    assert_eq!(e_node.feeds_open, 1, "one upstream feed per room per node, not per subscriber");
    drop(second);
    // A second room of the same shard: its feed on e follows the same replica on the same
    // stream as the first room's (one stream per node pair, not per room).
    let ring = ShardRing::new(SHARDS);
    let sibling = (0..1000)
        .map(|n| format!("near-{n}"))
        .find(|name| ring.shard_of_room(&RoomId(name.clone())).0 == shard)
        .expect("another room of the shard");
    at_e.create_room(authed(CreateRoomRequest { room: sibling.clone(), ..Default::default() }, &bob))
        .await
        .expect("create the sibling room");
    let request = SubscribeRequest { room: sibling.clone(), version_vector: None };
    let mut sibling_stream = at_e.subscribe(authed(request, &bob)).await.expect("subscribe").into_inner();
    post(&mut at_e, &bob, &sibling, "near-0", AckLevel::Quorum).await.expect("post");
    let mut sibling_vector = std::collections::BTreeMap::new();
    assert_eq!(read_messages(&mut sibling_stream, &mut sibling_vector, 1).await, ["near-0"]);
    let e_status = cluster.status_from(e).await;
    let e_node = e_status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[e].addr).expect("node e");
    assert_eq!(e_node.feeds_open, 2);
    assert_eq!(metric(&cluster, e, "follow_streams_open").await, 1, "both feeds share one stream");
    assert!(metric(&cluster, e, "feed_upstream_events").await >= 4, "the feeds' events came on it");
    drop(sibling_stream);
    let edit = EditRequest { room: room.clone(), message_id: ids[0].clone(), body: "far-0!".into(), ack: 0 };
    at_e.edit(authed(edit, &ada)).await.expect("edit");
    let react =
        ReactRequest { room: room.clone(), message_id: ids[1].clone(), reaction: "+1".into(), remove: false, ack: 0 };
    at_e.react(authed(react, &bob)).await.expect("react");
    at_e.typing(authed(TypingRequest { room: room.clone(), typing: true }, &bob)).await.expect("typing");
    let history = HistoryRequest { room: room.clone(), limit: 10, oldest_first: true, ..Default::default() };
    let page = at_e.history(authed(history, &bob)).await.expect("history").into_inner();
    let bodies: Vec<String> = page.messages.iter().map(|m| m.body.clone()).collect();
    assert_eq!(bodies, ["far-0!", "far-1", "far-2"]);
    assert_eq!(page.messages[1].reactions.len(), 1);
    // The subscriber sees the edit and the reaction too.
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        kinds.push(next_message(&mut stream, &mut version_vector).await.kind);
    }
    use palaver_proto::v1::MessageEventKind;
    assert_eq!(kinds, [MessageEventKind::Edited as i32, MessageEventKind::Reacted as i32]);

    // Typed errors cross the hop: a non-member, an unknown message.
    let carol = user(&mut at_e, "carol").await;
    let refused = post(&mut at_e, &carol, &room, "intruding", AckLevel::Quorum).await.expect_err("not a member");
    assert_eq!(code(&refused), "not_member");
    let edit = EditRequest { room: room.clone(), message_id: "0".repeat(32), body: "x".into(), ack: 0 };
    assert_eq!(code(&at_e.edit(authed(edit, &ada)).await.expect_err("no such message")), "message_not_found");

    // Bob leaves; posts go on; he resumes on the other non-replica node with his vector and
    // gets exactly what he missed, then live events.
    drop(stream);
    for i in 3..5 {
        post(&mut at_e, &ada, &room, &format!("far-{i}"), AckLevel::Quorum).await.expect("post");
    }
    let mut at_f = cluster.chat(f);
    let resume = VersionVector { entries: version_vector.clone().into_iter().collect() };
    let request = SubscribeRequest { room: room.clone(), version_vector: Some(resume) };
    let mut stream = at_f.subscribe(authed(request, &bob)).await.expect("resubscribe").into_inner();
    let mut posted = BTreeSet::new();
    while posted.len() < 2 {
        let message = next_message(&mut stream, &mut version_vector).await;
        posted.insert(message.message.map(|m| m.body).unwrap_or_default());
    }
    assert_eq!(posted, BTreeSet::from(["far-3".to_string(), "far-4".to_string()]));
    post(&mut at_e, &ada, &room, "far-live", AckLevel::Quorum).await.expect("post");
    assert_eq!(read_messages(&mut stream, &mut version_vector, 1).await, ["far-live"]);

    // Nothing forged made it into the directory.
    let seen = cluster.status_from(e).await;
    let directory = seen.shards.iter().find(|s| s.shard == shard).and_then(|s| s.directory.clone()).expect("record");
    assert!(directory.found);
    assert!(directory.leader != 90 && !directory.replicas.contains(&90), "{directory:?}");

    // Kill the node e's cached route names as the shard's leader: the next writes re-resolve.
    // One consensus write through e first, so that its cache names the leader (a route
    // resolved only for posts may name no leader, and the write after the kill could then find
    // the new one without a stale answer to correct).
    let erin = user(&mut at_e, "erin").await;
    at_e.join(authed(RoomRequest { room: room.clone() }, &erin)).await.expect("join through e");
    let leader = cluster.leader_of(shard).await;
    // A feed follows the first replica of its route that serves it: the one f's feed is on.
    let followed = {
        let seen = cluster.status_from(f).await;
        let record = seen.shards.iter().find(|s| s.shard == shard).and_then(|s| s.directory.clone()).expect("record");
        let f_id = seen.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[f].addr).expect("node f").node_id;
        let first = record.replicas.iter().copied().find(|id| *id != f_id).expect("a replica");
        cluster.index_of(&seen, first)
    };
    let old_term = {
        let status = cluster.status().await.expect("status");
        status.shards.iter().find(|s| s.shard == shard).expect("the room's shard").term
    };
    let before = routes_of(&cluster, e).await;
    cluster.kill(leader).await;
    // Let the survivors elect a leader before e tries again. Then e's route is corrected by
    // their answers (the dead leader named, then their newer epoch), not replaced from the DHT
    // after whole rounds of "no leader" answers: that would leave no stale epoch to hint at.
    wait_for("a leader among the survivors, in a later term", || async {
        let status = cluster.status().await?;
        let group = status.shards.iter().find(|s| s.shard == shard)?;
        (group.leader != 0 && group.term > old_term).then_some(())
    })
    .await;
    let dave = user(&mut at_e, "dave").await;
    at_e.join(authed(RoomRequest { room: room.clone() }, &dave)).await.expect("join after the leader died");
    post(&mut at_e, &dave, &room, "after-kill", AckLevel::Quorum).await.expect("post after the leader died");
    let after = routes_of(&cluster, e).await;
    assert!(after.corrections > before.corrections, "the stale route was corrected: {before:?} -> {after:?}");
    assert!(after.epoch_hints > before.epoch_hints, "a replica's newer epoch replaced the route: {after:?}");
    assert!(after.cache_hits > before.cache_hits, "routes come from the cache: {after:?}");
    // Kill the replica f's feed follows too (if the leader was not it): Bob's subscription on f
    // lives on, its feed moved to the last replica (its stream to the dead node broke) and
    // resumed from what it held. One replica is left, so the post asks for ack `one`.
    if followed != leader {
        cluster.kill(followed).await;
    }
    post(&mut at_e, &dave, &room, "one-left", AckLevel::One).await.expect("post with one replica left");
    let mut last = read_messages(&mut stream, &mut version_vector, 2).await;
    last.sort();
    assert_eq!(last, ["after-kill", "one-left"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_through_the_newest_node_and_the_dht_outlives_the_meta_leader() {
    let mut cluster = TestCluster::start(3, SHARDS, &[]).await;
    // The fourth node joins through the third (gRPC), the fifth through the fourth's multiaddr.
    let fourth = cluster.add_node(&["--join".into(), cluster.nodes[2].addr.clone()]).await;
    let status = wait_for("the fourth node's swarm", || async {
        let status = cluster.status_from(fourth).await;
        let me = status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[fourth].addr)?;
        (!me.p2p_addrs.is_empty()).then_some(status)
    })
    .await;
    let multiaddr =
        status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[fourth].addr).expect("node").p2p_addrs[0].clone();
    assert!(multiaddr.contains("/p2p/"), "{multiaddr}");
    let fifth = cluster.add_node(&["--join".into(), multiaddr]).await;
    wait_for("the fifth node to find every other node", || async {
        let status = cluster.status_from(fifth).await;
        let me = status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[fifth].addr)?;
        (status.nodes.len() == 5 && me.dht_peers.len() == 4).then_some(())
    })
    .await;
    cluster.wait_replicated(5).await;
    let mut at_fifth = cluster.chat(fifth);
    let ada = user(&mut at_fifth, "ada").await;
    at_fifth
        .create_room(authed(CreateRoomRequest { room: "newest".into(), ..Default::default() }, &ada))
        .await
        .expect("the fifth node serves");
    post(&mut at_fifth, &ada, "newest", "hello", AckLevel::Quorum).await.expect("post through the fifth node");

    // Take the meta group's leader down. A node that never routed to some shard (and holds no
    // replica of it) still finds its leader: from the DHT.
    let status = cluster.status().await.expect("status");
    let meta_leader = status.shards.iter().find(|s| s.shard == 0).expect("meta").leader;
    let meta_index = cluster.index_of(&status, meta_leader);
    let (room, entry) = (0..1000)
        .map(|n| format!("dark-{n}"))
        .find_map(|room| {
            let ring = ShardRing::new(SHARDS);
            let shard = ring.shard_of_room(&RoomId(room.clone())).0;
            let voters = &status.shards.iter().find(|s| s.shard == shard)?.voters;
            // Away from the meta leader, and not the shard bob's registration routes to (so
            // that the entry node has no route to it yet).
            if voters.contains(&meta_leader) || ring.shard_of_user(&palaver_ids::UserName("bob".into())).0 == shard {
                return None;
            }
            let entry = status.nodes.iter().find(|n| n.node_id != meta_leader && !voters.contains(&n.node_id))?;
            Some((room, cluster.index_of(&status, entry.node_id)))
        })
        .expect("a shard away from the meta leader");
    let mut client = cluster.chat(entry);
    let bob = user(&mut client, "bob").await;
    cluster.kill(meta_index).await;
    let before = routes_of(&cluster, entry).await;
    client
        .create_room(authed(CreateRoomRequest { room: room.clone(), ..Default::default() }, &bob))
        .await
        .expect("create with the meta leader down");
    post(&mut client, &bob, &room, "still here", AckLevel::Quorum).await.expect("post with the meta leader down");
    let after = routes_of(&cluster, entry).await;
    assert!(after.dht_found > before.dht_found, "the route came from the DHT: {before:?} -> {after:?}");
}
