//! The CRDT plane through a network partition: three in-process nodes whose peer traffic runs
//! through loopback TCP proxies that the test can cut, so one replica is really cut off (real
//! sockets, connections reset) while clients still reach it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use palaver_node::{Bootstrap, Dialer, Node, NodeConfig, NodeEnv, SharedRng, SystemClock};
use palaver_proto::v1::admin_service_client::AdminServiceClient;
use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{AckLevel, CreateRoomRequest, HistoryRequest, RoomRequest, StatusRequest};
use palaver_proto::v1::{RoomEvent, SubscribeRequest, room_event};
use palaver_shard::{KvEngine, MemEngine, ReplicaOptions, StallingEngine};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use crate::harness::{authed, code, post, user, wait_for};

/// The network between in-process nodes: which directed links are cut.
#[derive(Debug, Default)]
struct Net {
    /// (from node address, to node address) pairs whose traffic is dropped.
    cut: Mutex<BTreeSet<(String, String)>>,
    proxies: Mutex<Vec<Arc<Proxy>>>,
}

impl Net {
    fn is_cut(&self, from: &str, to: &str) -> bool {
        self.cut.lock().expect("net lock").contains(&(from.to_owned(), to.to_owned()))
    }

    /// Cut every link to and from `addr`, and reset the connections on them.
    fn isolate(&self, addr: &str, all: &[String]) {
        {
            let mut cut = self.cut.lock().expect("net lock");
            for other in all.iter().filter(|a| *a != addr) {
                cut.insert((addr.to_owned(), other.clone()));
                cut.insert((other.clone(), addr.to_owned()));
            }
        }
        for proxy in self.proxies.lock().expect("net lock").iter() {
            if self.is_cut(&proxy.from, &proxy.to) {
                proxy.reset();
            }
        }
    }

    /// Cut the links between `x` and `y` (both ways), and reset the connections on them.
    fn cut_between(&self, x: &str, y: &str) {
        {
            let mut cut = self.cut.lock().expect("net lock");
            cut.insert((x.to_owned(), y.to_owned()));
            cut.insert((y.to_owned(), x.to_owned()));
        }
        for proxy in self.proxies.lock().expect("net lock").iter() {
            if self.is_cut(&proxy.from, &proxy.to) {
                proxy.reset();
            }
        }
    }

    fn heal(&self) {
        self.cut.lock().expect("net lock").clear();
    }
}

/// A loopback TCP proxy for the traffic of one node (`from`) to another (`to`).
#[derive(Debug)]
struct Proxy {
    from: String,
    to: String,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    fn reset(&self) {
        for connection in self.connections.lock().expect("proxy lock").drain(..) {
            connection.abort();
        }
    }
}

/// Dials peers through a [`Proxy`] per target, so the test can cut links.
#[derive(Debug)]
struct ProxyDialer {
    from: String,
    net: Arc<Net>,
}

impl Dialer for ProxyDialer {
    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let listener = TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        let proxy =
            Arc::new(Proxy { from: self.from.clone(), to: addr.to_owned(), connections: Mutex::new(Vec::new()) });
        self.net.proxies.lock().expect("net lock").push(proxy.clone());
        let net = self.net.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if net.is_cut(&proxy.from, &proxy.to) {
                    continue; // dropped: the connection is reset
                }
                let to = proxy.to.clone();
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                proxy.connections.lock().expect("proxy lock").push(connection);
            }
        });
        let endpoint = Endpoint::from_shared(format!("http://{local}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_millis(500))
            .timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        Ok(endpoint.connect_lazy())
    }
}

/// The environment and configuration of node `i` of `addrs` (the first one creates the
/// cluster with `shards` data shards; the others join it through the first).
fn node_setup(addrs: &[String], i: usize, shards: u32, net: &Arc<Net>) -> (NodeEnv, NodeConfig) {
    let env = NodeEnv {
        clock: Arc::new(SystemClock),
        dialer: Arc::new(ProxyDialer { from: addrs[i].clone(), net: net.clone() }),
        rng: SharedRng::seeded(i as u64 + 1),
    };
    let bootstrap = if i == 0 {
        Bootstrap::InitCluster { shard_count: shards }
    } else {
        Bootstrap::Join { seed: addrs[0].clone() }
    };
    let config = NodeConfig {
        data_dir: std::env::temp_dir(),
        advertise_addr: addrs[i].clone(),
        bootstrap,
        replica: ReplicaOptions::default(),
        p2p_listen: None,
        http: None,
        grpc_connections_per_address: palaver_node::connections::GRPC_CONNECTIONS_PER_ADDRESS_DEFAULT,
    };
    (env, config)
}

struct InProcessCluster {
    nodes: Vec<Node>,
    addrs: Vec<String>,
}

impl InProcessCluster {
    async fn start(n: usize, shards: u32, net: &Arc<Net>) -> Self {
        let engines = (0..n).map(|_| Arc::new(MemEngine::new()) as Arc<dyn KvEngine>).collect();
        Self::start_on(engines, shards, net).await
    }

    /// Start one node per engine.
    async fn start_on(engines: Vec<Arc<dyn KvEngine>>, shards: u32, net: &Arc<Net>) -> Self {
        let n = engines.len();
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..n {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            addrs.push(listener.local_addr().expect("addr").to_string());
            listeners.push(listener);
        }
        let mut nodes = Vec::new();
        for (i, (listener, engine)) in listeners.into_iter().zip(engines).enumerate() {
            let (env, config) = node_setup(&addrs, i, shards, net);
            nodes.push(Node::start(config, env, engine, listener).await.expect("start"));
        }
        let cluster = InProcessCluster { nodes, addrs };
        wait_for("every shard led with three voters", || async {
            let status = status_from(&cluster, 0).await?;
            let ready = status.nodes.len() == n && status.shards.iter().all(|s| s.leader != 0 && s.voters.len() == 3);
            ready.then_some(())
        })
        .await;
        cluster
    }

    fn chat(&self, i: usize) -> ChatServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addrs[i])).expect("address").connect_lazy();
        ChatServiceClient::new(channel)
    }

    async fn shutdown(self) {
        for node in self.nodes {
            node.shutdown().await;
        }
    }
}

/// `room`, created by ada on the first node and joined by bob on the third, once every
/// replica has applied the join. Returns their tokens.
async fn room_of_two(cluster: &InProcessCluster, room: &str) -> (String, String) {
    let (mut a, mut c) = (cluster.chat(0), cluster.chat(2));
    let ada = user(&mut a, "ada").await;
    let bob = user(&mut c, "bob").await;
    a.create_room(authed(CreateRoomRequest { room: room.into(), ..Default::default() }, &ada)).await.expect("create");
    let joined = c.join(authed(RoomRequest { room: room.into() }, &bob)).await.expect("join").into_inner();
    wait_for("every replica to apply the join", || async {
        let status = status_from(cluster, 0).await?;
        let shard = status.shards.iter().find(|s| s.shard == joined.shard)?;
        let applied = shard.replicas.iter().filter(|r| r.last_applied_index >= joined.log_index).count();
        (applied == 3).then_some(())
    })
    .await;
    (ada, bob)
}

/// Every message id of `room` as node `i` shows it, oldest first.
async fn history(cluster: &InProcessCluster, i: usize, token: &str, room: &str) -> Option<Vec<String>> {
    let request = HistoryRequest { room: room.into(), limit: 500, oldest_first: true, ..Default::default() };
    let page = cluster.chat(i).history(authed(request, token)).await.ok()?.into_inner();
    Some(page.messages.into_iter().map(|m| m.message_id).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_replica_keeps_accepting_and_all_converge_after_heal() {
    let net = Arc::new(Net::default());
    let cluster = InProcessCluster::start(3, 2, &net).await;
    let (mut a, mut b, mut c) = (cluster.chat(0), cluster.chat(1), cluster.chat(2));
    // Every replica has applied the join before the cut: the cut-off one checks membership
    // against its own applied state.
    let (ada, bob) = room_of_two(&cluster, "split").await;
    let mut acknowledged =
        vec![post(&mut c, &bob, "split", "before", AckLevel::Quorum).await.expect("post before the cut")];

    net.isolate(&cluster.addrs[2], &cluster.addrs);
    for i in 0..5 {
        let client = if i % 2 == 0 { &mut a } else { &mut b };
        let id = post(client, &ada, "split", &format!("majority-{i}"), AckLevel::Quorum)
            .await
            .expect("quorum posts succeed on the majority side");
        acknowledged.push(id);
    }
    for i in 0..5 {
        let id = post(&mut c, &bob, "split", &format!("minority-{i}"), AckLevel::One)
            .await
            .expect("ack-one posts succeed on the cut-off replica");
        acknowledged.push(id);
    }
    let refused =
        post(&mut c, &bob, "split", "minority-quorum", AckLevel::Quorum).await.expect_err("no second replica");
    assert_eq!(code(&refused), "quorum_timeout", "{refused:?}");
    acknowledged.push(post(&mut c, &bob, "split", "minority-quorum", AckLevel::One).await.expect("retry"));
    assert_eq!(
        acknowledged.iter().collect::<BTreeSet<_>>().len(),
        acknowledged.len(),
        "the retry of the timed-out post is the same message, and nothing else repeats"
    );

    net.heal();
    let converged = wait_for("the three replicas to converge", || async {
        let mut views = Vec::new();
        for i in 0..3 {
            views.push(history(&cluster, i, &ada, "split").await?);
        }
        (views[0].len() == acknowledged.len() && views.iter().all(|v| *v == views[0])).then(|| views[0].clone())
    })
    .await;
    let held: BTreeSet<&String> = converged.iter().collect();
    for id in &acknowledged {
        assert!(held.contains(id), "acknowledged message {id} is missing");
    }
    cluster.shutdown().await;
}

/// A writer cut off from one replica of its room, but not from the other: its posts reach the
/// cut-off replica all the same, relayed by the other (each replica pushes only its own writes
/// at once, and relays a third replica's events that a peer still lacks a moment later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_cut_off_from_one_replica_reaches_it_through_the_other() {
    let net = Arc::new(Net::default());
    let cluster = InProcessCluster::start(3, 2, &net).await;
    let mut a = cluster.chat(0);
    let ada = user(&mut a, "ada").await;
    a.create_room(authed(CreateRoomRequest { room: "relay".into(), ..Default::default() }, &ada))
        .await
        .expect("create");
    // Node 1's replica checks membership against its own applied state.
    let first = wait_for("node 1 to accept posts in the new room", || async {
        post(&mut cluster.chat(0), &ada, "relay", "first", AckLevel::Quorum).await.ok()
    })
    .await;
    wait_for("the first post on node 3", || async {
        history(&cluster, 2, &ada, "relay").await.filter(|ids| ids.contains(&first)).map(|_| ())
    })
    .await;

    net.cut_between(&cluster.addrs[0], &cluster.addrs[2]);
    let mut acknowledged = vec![first];
    for i in 0..5 {
        let id = post(&mut a, &ada, "relay", &format!("cut-{i}"), AckLevel::Quorum)
            .await
            .expect("node 2 acknowledges for the quorum");
        acknowledged.push(id);
    }
    let on_c = wait_for("node 3 to hold every post while still cut off from their writer", || async {
        let ids = history(&cluster, 2, &ada, "relay").await?;
        (ids.len() == acknowledged.len()).then_some(ids)
    })
    .await;
    assert_eq!(on_c, acknowledged, "the same posts, in the same order");
    cluster.shutdown().await;
}

/// The cluster status as node `i` answers it.
async fn status_from(cluster: &InProcessCluster, i: usize) -> Option<palaver_proto::v1::StatusResponse> {
    let channel = Channel::from_shared(format!("http://{}", cluster.addrs[i])).ok()?.connect().await.ok()?;
    Some(AdminServiceClient::new(channel).status(StatusRequest {}).await.ok()?.into_inner())
}

/// Whether every replica of every shard reports its Raft timer stopped, as node `i` sees it.
async fn all_asleep(cluster: &InProcessCluster, i: usize) -> Option<()> {
    let status = status_from(cluster, i).await?;
    let asleep = status.shards.iter().all(|s| s.replicas.len() == 3 && s.replicas.iter().all(|r| r.asleep));
    asleep.then_some(())
}

/// Idle groups sleep: with nothing written, every replica of every group stops its Raft timer
/// (one beat per node pair stands in for the heartbeats). A write to a sleeping group commits,
/// and the group sleeps again after it. Then the leader of a sleeping group is cut off: its
/// followers hear no beat from its node, wake the group, elect a leader among themselves, and
/// the next write commits through them. After the heal all three agree again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_sleep_and_a_silent_leader_is_replaced() {
    let net = Arc::new(Net::default());
    let cluster = InProcessCluster::start(3, 2, &net).await;
    let mut a = cluster.chat(0);
    let ada = user(&mut a, "ada").await;
    a.create_room(authed(CreateRoomRequest { room: "quiet".into(), ..Default::default() }, &ada))
        .await
        .expect("create");
    wait_for("every replica of every group to sleep", || all_asleep(&cluster, 0)).await;
    // Registering writes at once, with no read before it: its leader renews its lease first.
    let bob = user(&mut a, "bob").await;
    let carol = user(&mut a, "carol").await;

    let joined = a.join(authed(RoomRequest { room: "quiet".into() }, &bob)).await.expect("join").into_inner();
    let shard = joined.shard;
    wait_for("every replica to apply the join and sleep again", || async {
        let status = status_from(&cluster, 0).await?;
        let group = status.shards.iter().find(|s| s.shard == shard)?;
        let applied = group.replicas.iter().all(|r| r.last_applied_index >= joined.log_index);
        (applied && all_asleep(&cluster, 0).await.is_some()).then_some(())
    })
    .await;

    let status = status_from(&cluster, 0).await.expect("status");
    let old_leader = status.shards.iter().find(|s| s.shard == shard).expect("the room's shard").leader;
    let old_term = status.shards.iter().find(|s| s.shard == shard).expect("the room's shard").term;
    let cut = status
        .nodes
        .iter()
        .find(|n| n.node_id == old_leader)
        .and_then(|n| cluster.addrs.iter().position(|a| *a == n.grpc_addr))
        .expect("the leader's address");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != cut).collect();
    net.isolate(&cluster.addrs[cut], &cluster.addrs);

    let survivor = survivors[0];
    wait_for("a leader among the survivors, in a later term", || async {
        let status = status_from(&cluster, survivor).await?;
        let group = status.shards.iter().find(|s| s.shard == shard)?;
        (group.leader != 0 && group.leader != old_leader && group.term > old_term).then_some(())
    })
    .await;
    wait_for("a write through the survivors", || async {
        cluster.chat(survivor).join(authed(RoomRequest { room: "quiet".into() }, &carol)).await.ok()
    })
    .await;
    let woken: u64 = survivors.iter().map(|i| cluster.nodes[*i].inner().quiesce.silence_wakes()).sum();
    assert!(woken > 0, "the survivors woke the group because its leader's node went silent");

    net.heal();
    wait_for("all three replicas to agree on the leader and sleep again", || async {
        let status = status_from(&cluster, cut).await?;
        let group = status.shards.iter().find(|s| s.shard == shard)?;
        let agree = group.replicas.len() == 3 && group.replicas.iter().all(|r| r.leader == group.leader);
        (agree && all_asleep(&cluster, cut).await.is_some()).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

/// The next posted message's body on `stream`, skipping other events.
async fn next_post(stream: &mut tonic::Streaming<RoomEvent>) -> String {
    loop {
        let event = stream.message().await.expect("stream").expect("stream open");
        if let Some(room_event::Event::Message(message)) = event.event
            && let Some(body) = message.message.map(|m| m.body)
            && !body.is_empty()
        {
            return body;
        }
    }
}

/// A replica whose disk stalls (its fsyncs hang) still shows its subscribers what a peer
/// sends: a peer's events are shown once applied, before the local fsync, and the peer's
/// courier does not wait for the answer to a stalled call before sending the next post (it
/// sends one more call once the first has waited a moment). Without either, the posts would
/// wait until the stalled call fails at its 5 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_fsync_stalls_still_shows_its_subscribers_what_peers_send() {
    let net = Arc::new(Net::default());
    let stalling = Arc::new(StallingEngine::default());
    let engines: Vec<Arc<dyn KvEngine>> =
        vec![Arc::new(MemEngine::new()), Arc::new(MemEngine::new()), stalling.clone()];
    let cluster = InProcessCluster::start_on(engines, 2, &net).await;
    let (mut a, mut c) = (cluster.chat(0), cluster.chat(2));
    let (ada, bob) = room_of_two(&cluster, "stall").await;
    let request = SubscribeRequest { room: "stall".into(), version_vector: None };
    let mut stream = c.subscribe(authed(request, &bob)).await.expect("subscribe").into_inner();
    loop {
        let event = stream.message().await.expect("stream").expect("stream open");
        if matches!(event.event, Some(room_event::Event::CaughtUp(_))) {
            break;
        }
    }

    // Only the first node's own pushes can bring its posts: the second node, which would
    // relay them a moment later, is cut off from the third.
    net.cut_between(&cluster.addrs[1], &cluster.addrs[2]);
    stalling.stall(true);
    let within = Duration::from_secs(3);
    for body in ["first", "second", "third"] {
        post(&mut a, &ada, "stall", body, AckLevel::One).await.expect("ack one needs only the first node");
        let shown = tokio::time::timeout(within, next_post(&mut stream)).await;
        assert_eq!(shown.as_deref(), Ok(body), "{body} reaches the stalled replica's subscriber");
    }
    stalling.stall(false);
    net.heal();
    drop(stream);
    // Once the disk is back, the stalled replica takes part in quorums again.
    let id = post(&mut c, &bob, "stall", "after", AckLevel::Quorum).await.expect("quorum post on the recovered node");
    wait_for("the first node to hold the last post", || async {
        let page = history(&cluster, 0, &ada, "stall").await?;
        (page.len() == 4 && page.last() == Some(&id)).then_some(())
    })
    .await;
    cluster.shutdown().await;
}

/// Wait until every replica of `shard` has applied `index`.
async fn applied_everywhere(cluster: &InProcessCluster, shard: u32, index: u64) {
    wait_for("every replica to apply the change", || async {
        let status = status_from(cluster, 0).await?;
        let shard = status.shards.iter().find(|s| s.shard == shard)?;
        (shard.replicas.iter().filter(|r| r.last_applied_index >= index).count() == 3).then_some(())
    })
    .await;
}

/// A replica rebuilds its state machine at a restart from the log, up to the committed id it
/// saved. Restarted while cut off from every peer (so no leader can tell it more), it must
/// still enforce a ban it had applied: when that id was saved only every 64 entries, a ban
/// among the last ones was forgotten and the banned user could post there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_while_cut_off_still_enforces_a_ban_it_had_applied() {
    use palaver_proto::v1::BanRequest;
    let net = Arc::new(Net::default());
    let engines: Vec<Arc<dyn KvEngine>> = (0..3).map(|_| Arc::new(MemEngine::new()) as Arc<dyn KvEngine>).collect();
    let mut cluster = InProcessCluster::start_on(engines.clone(), 1, &net).await;
    let (mut a, mut c) = (cluster.chat(0), cluster.chat(2));
    let (ada, bob) = room_of_two(&cluster, "guarded").await;
    // More than 64 commits after the join, so that a save every 64 entries falls between the
    // join and the ban: a replica restarted on such a save knows bob as a member, not as banned.
    let carol = user(&mut a, "carol").await;
    a.create_room(authed(CreateRoomRequest { room: "busy".into(), ..Default::default() }, &ada)).await.expect("create");
    for _ in 0..35 {
        a.join(authed(RoomRequest { room: "busy".into() }, &carol)).await.expect("join");
        a.leave(authed(RoomRequest { room: "busy".into() }, &carol)).await.expect("leave");
    }
    let banned = a
        .ban(authed(BanRequest { room: "guarded".into(), user: "bob".into(), reason: "spam".into() }, &ada))
        .await
        .expect("ban")
        .into_inner();
    applied_everywhere(&cluster, banned.shard, banned.log_index).await;
    let refused = post(&mut c, &bob, "guarded", "before the restart", AckLevel::One).await.expect_err("banned");
    let refusal = code(&refused);

    // Cut the third node off, then restart it on its engine, still cut off.
    net.isolate(&cluster.addrs[2], &cluster.addrs);
    let node = cluster.nodes.remove(2);
    node.shutdown().await;
    let listener = TcpListener::bind(&cluster.addrs[2]).await.expect("rebind the node's address");
    let (env, config) = node_setup(&cluster.addrs, 2, 1, &net);
    cluster.nodes.push(Node::start(config, env, engines[2].clone(), listener).await.expect("restart"));
    let c = cluster.chat(2);
    let after = wait_for("the restarted replica to answer bob's post", || {
        let (mut c, bob) = (c.clone(), bob.clone());
        async move {
            match post(&mut c, &bob, "guarded", "after the restart", AckLevel::One).await {
                Err(status) if status.code() == tonic::Code::Unavailable => None,
                answer => Some(answer),
            }
        }
    })
    .await;
    let refused = after.expect_err("the restarted replica still knows bob is banned");
    assert_eq!(code(&refused), refusal, "{refused:?}");
    cluster.shutdown().await;
}
