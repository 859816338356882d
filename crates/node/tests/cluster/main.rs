//! Integration tests of the consensus plane: real `palaver node` processes on loopback.

mod browser;
mod chat_client;
mod grpc_limits;
mod harness;
mod http_api;
mod in_process;
mod messages;
mod partition;
mod pipeline;
mod routing;
mod subscribe_rooms;
mod websocket;

use harness::{TestCluster, authed, code, login, user, wait_for};
use palaver_proto::v1::{
    BanRequest, CreateRoomRequest, LoginRequest, RegisterRequest, Role, RoomRequest, SetRoleRequest, TargetRequest,
};

/// Members and roles of `room` as node `i` answers.
async fn members(cluster: &TestCluster, i: usize, token: &str, room: &str) -> Vec<(String, i32)> {
    let room = cluster
        .chat(i)
        .get_room(authed(RoomRequest { room: room.into() }, token))
        .await
        .unwrap_or_else(|e| panic!("get_room on node {}: {e}", i + 1))
        .into_inner();
    room.members.into_iter().map(|m| (m.user, m.role)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_give_the_same_answers() {
    let cluster = TestCluster::start(3, 4, &[]).await;
    // Each user talks to a different node: every node serves every call.
    let (mut a, mut b, mut c) = (cluster.chat(0), cluster.chat(1), cluster.chat(2));
    let olga = user(&mut a, "olga").await;
    let bob = user(&mut b, "bob").await;
    let carl = user(&mut c, "carl").await;

    a.create_room(authed(
        CreateRoomRequest { room: "general".into(), title: "General".into(), ..Default::default() },
        &olga,
    ))
    .await
    .expect("create room");
    b.join(authed(RoomRequest { room: "general".into() }, &bob)).await.expect("bob joins");
    c.join(authed(RoomRequest { room: "general".into() }, &carl)).await.expect("carl joins");
    a.set_role(authed(SetRoleRequest { room: "general".into(), user: "bob".into(), role: Role::Admin as i32 }, &olga))
        .await
        .expect("olga makes bob admin");
    b.kick(authed(TargetRequest { room: "general".into(), user: "carl".into() }, &bob)).await.expect("bob kicks carl");
    // A member may not kick.
    let refused = c
        .kick(authed(TargetRequest { room: "general".into(), user: "bob".into() }, &carl))
        .await
        .expect_err("carl was kicked and has no rank");
    assert_eq!(code(&refused), "permission_denied");

    let expected = vec![("bob".to_string(), Role::Admin as i32), ("olga".to_string(), Role::Owner as i32)];
    for i in 0..3 {
        assert_eq!(members(&cluster, i, &olga, "general").await, expected, "node {} disagrees", i + 1);
    }
    // The shard group of the room has three voters on three distinct nodes.
    let status = cluster.status().await.expect("status");
    for shard in &status.shards {
        let distinct: std::collections::BTreeSet<_> = shard.voters.iter().collect();
        assert_eq!(distinct.len(), 3, "shard {} voters {:?}", shard.shard, shard.voters);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_and_the_old_one_catches_up() {
    let mut cluster = TestCluster::start(3, 4, &[]).await;
    let mut setup = cluster.chat(0);
    let olga = user(&mut setup, "olga").await;
    let room = setup
        .create_room(authed(CreateRoomRequest { room: "ops".into(), ..Default::default() }, &olga))
        .await
        .expect("create")
        .into_inner();
    let leader = cluster.leader_of(room.shard).await;
    let survivor = (leader + 1) % 3;
    let mut client = cluster.chat(survivor);
    let token = user(&mut client, "sam").await;
    // Left alone, the group sleeps: its followers then learn of the leader's death from its
    // node's silence, not from their own election timers.
    cluster.wait_asleep(Some(room.shard)).await;

    cluster.kill(leader).await;
    // The same client, unchanged: the node routes to the new leader once one is elected.
    client.join(authed(RoomRequest { room: "ops".into() }, &token)).await.expect("write after leader loss");
    let new_leader = cluster.leader_of(room.shard).await;
    assert_ne!(new_leader, leader);

    cluster.restart(leader).await;
    let restarted_id = {
        let status = cluster.status().await.expect("status");
        status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[leader].addr).expect("listed").node_id
    };
    // The restarted replica catches up to the leader's applied index on the room's shard.
    wait_for("the restarted replica to catch up", || async {
        let status = cluster.status().await?;
        let shard = status.shards.iter().find(|s| s.shard == room.shard)?;
        let mine = shard.replicas.iter().find(|r| r.node_id == restarted_id)?;
        (shard.leader != 0 && mine.last_applied_index >= shard.last_applied_index).then_some(())
    })
    .await;
    for i in 0..3 {
        let got = members(&cluster, i, &olga, "ops").await;
        assert_eq!(got, vec![("olga".into(), Role::Owner as i32), ("sam".into(), Role::Member as i32)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_changes_survive_a_full_restart() {
    let mut cluster = TestCluster::start(3, 4, &[]).await;
    let mut client = cluster.chat(1);
    let olga = user(&mut client, "olga").await;
    let mut rooms = Vec::new();
    for i in 0..8 {
        let room = format!("room-{i}");
        client
            .create_room(authed(CreateRoomRequest { room: room.clone(), ..Default::default() }, &olga))
            .await
            .expect("create");
        rooms.push(room);
    }
    let mia = user(&mut client, "mia").await;
    for room in &rooms {
        client.join(authed(RoomRequest { room: room.clone() }, &mia)).await.expect("join");
    }
    // Kill -9 one node, stop the others cleanly: both paths must keep every acknowledged write.
    cluster.kill(0).await;
    cluster.stop(1).await;
    cluster.stop(2).await;
    for i in 0..3 {
        cluster.restart(i).await;
    }
    // Log in at once, through every node, while the groups are still settling: a node may be
    // unavailable for a moment, but whoever answers must know mia (a leader that answered from
    // the state it replayed at restart, before learning the true commit, would not).
    for i in [0, 1, 2] {
        let client = cluster.chat(i);
        wait_for("a login after the restart", || {
            let mut client = client.clone();
            async move {
                let request = LoginRequest { user: "mia".into(), password: "password-of-mia".into() };
                match client.login(request).await {
                    Ok(_) => Some(()),
                    Err(status) if status.code() == tonic::Code::Unavailable => None,
                    Err(status) => panic!("login through node {} after the restart: {status}", i + 1),
                }
            }
        })
        .await;
    }
    cluster.wait_replicated(3).await;
    let mut client = cluster.chat(2);
    let token = login(&mut client, "mia").await;
    for room in &rooms {
        let got = members(&cluster, 2, &token, room).await;
        assert_eq!(got, vec![("mia".into(), Role::Member as i32), ("olga".into(), Role::Owner as i32)], "{room}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_far_behind_catches_up_from_a_snapshot() {
    // Snapshot every 20 entries and keep only 4 behind it: a replica that misses more than that
    // can only catch up by receiving a snapshot.
    let mut cluster = TestCluster::start(3, 1, &["--snapshot-logs", "20"]).await;
    let mut client = cluster.chat(0);
    let olga = user(&mut client, "olga").await;
    client
        .create_room(authed(CreateRoomRequest { room: "busy".into(), ..Default::default() }, &olga))
        .await
        .expect("create");
    let status = cluster.status().await.expect("status");
    let lagging = (0..3).find(|i| *i != 0).expect("a node");
    let lagging_id = status.nodes.iter().find(|n| n.grpc_addr == cluster.nodes[lagging].addr).expect("listed").node_id;
    cluster.stop(lagging).await;
    let mia = user(&mut client, "mia").await;
    for _ in 0..60 {
        client.join(authed(RoomRequest { room: "busy".into() }, &mia)).await.expect("join");
        client.leave(authed(RoomRequest { room: "busy".into() }, &mia)).await.expect("leave");
    }
    client.join(authed(RoomRequest { room: "busy".into() }, &mia)).await.expect("final join");
    cluster.restart(lagging).await;
    let shard = wait_for("the lagging replica to catch up by snapshot", || async {
        let status = cluster.status().await?;
        let shard = status.shards.iter().find(|s| s.shard == 1)?.clone();
        let mine = shard.replicas.iter().find(|r| r.node_id == lagging_id)?;
        (shard.leader != 0 && mine.last_applied_index >= shard.last_applied_index && mine.snapshot_index > 0)
            .then_some(shard)
    })
    .await;
    assert!(shard.last_applied_index > 120, "the writes are in the log: {shard:?}");
    // It agrees: ask it (and only it) after making it the only way in.
    let got = members(&cluster, lagging, &olga, "busy").await;
    assert_eq!(got, vec![("mia".into(), Role::Member as i32), ("olga".into(), Role::Owner as i32)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_the_node_keeps_serving() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let mut client = cluster.chat(0);
    let olga = user(&mut client, "olga").await;
    let mia = user(&mut client, "mia").await;
    client
        .create_room(authed(CreateRoomRequest { room: "lobby".into(), ..Default::default() }, &olga))
        .await
        .expect("create");
    client.join(authed(RoomRequest { room: "lobby".into() }, &mia)).await.expect("join");

    let cases: Vec<(&str, tonic::Status, &str)> = vec![
        (
            "empty user name",
            client.register(RegisterRequest { user: "".into(), password: "long enough".into() }).await.expect_err(""),
            "invalid_input",
        ),
        (
            "over-long user name",
            client
                .register(RegisterRequest { user: "u".repeat(33), password: "long enough".into() })
                .await
                .expect_err(""),
            "invalid_input",
        ),
        (
            "short password",
            client.register(RegisterRequest { user: "pat".into(), password: "short".into() }).await.expect_err(""),
            "invalid_input",
        ),
        (
            "taken user name",
            client
                .register(RegisterRequest { user: "olga".into(), password: "long enough".into() })
                .await
                .expect_err(""),
            "user_exists",
        ),
        (
            "wrong password",
            client
                .login(LoginRequest { user: "olga".into(), password: "not her password".into() })
                .await
                .expect_err(""),
            "unauthenticated",
        ),
        (
            "unknown user login",
            client.login(LoginRequest { user: "nobody".into(), password: "whatever12".into() }).await.expect_err(""),
            "unauthenticated",
        ),
        (
            "no token",
            client.join(tonic::Request::new(RoomRequest { room: "lobby".into() })).await.expect_err(""),
            "unauthenticated",
        ),
        (
            "forged token",
            client
                .join(authed(RoomRequest { room: "lobby".into() }, &olga.replace("olga", "mia")))
                .await
                .expect_err(""),
            "unauthenticated",
        ),
        (
            "garbage token",
            client.join(authed(RoomRequest { room: "lobby".into() }, "v1.x.y.z")).await.expect_err(""),
            "unauthenticated",
        ),
        (
            "over-long room id",
            client
                .create_room(authed(CreateRoomRequest { room: "r".repeat(65), ..Default::default() }, &olga))
                .await
                .expect_err(""),
            "invalid_input",
        ),
        (
            "empty room id",
            client.join(authed(RoomRequest { room: "".into() }, &olga)).await.expect_err(""),
            "invalid_input",
        ),
        (
            "over-long topic",
            client
                .create_room(authed(
                    CreateRoomRequest { room: "t".into(), topic: "x".repeat(1025), ..Default::default() },
                    &olga,
                ))
                .await
                .expect_err(""),
            "invalid_input",
        ),
        (
            "unknown room",
            client.join(authed(RoomRequest { room: "nowhere".into() }, &olga)).await.expect_err(""),
            "room_not_found",
        ),
        (
            "unknown user as target",
            client
                .kick(authed(TargetRequest { room: "lobby".into(), user: "ghost".into() }, &olga))
                .await
                .expect_err(""),
            "user_not_found",
        ),
        (
            "unauthorized kick",
            client.kick(authed(TargetRequest { room: "lobby".into(), user: "olga".into() }, &mia)).await.expect_err(""),
            "permission_denied",
        ),
        (
            "unauthorized ban",
            client
                .ban(authed(BanRequest { room: "lobby".into(), user: "olga".into(), reason: String::new() }, &mia))
                .await
                .expect_err(""),
            "permission_denied",
        ),
        (
            "last owner leaves",
            client.leave(authed(RoomRequest { room: "lobby".into() }, &olga)).await.expect_err(""),
            "last_owner",
        ),
        (
            "unspecified role",
            client
                .set_role(authed(SetRoleRequest { room: "lobby".into(), user: "mia".into(), role: 0 }, &olga))
                .await
                .expect_err(""),
            "invalid_input",
        ),
        (
            "unknown role value",
            client
                .set_role(authed(SetRoleRequest { room: "lobby".into(), user: "mia".into(), role: 99 }, &olga))
                .await
                .expect_err(""),
            "invalid_input",
        ),
    ];
    for (what, status, want) in cases {
        assert_eq!(code(&status), want, "{what}: {status:?}");
        assert!(!status.message().is_empty(), "{what}: the error says what was wrong");
    }
    // Still serving, on every node.
    for i in 0..3 {
        assert_eq!(members(&cluster, i, &olga, "lobby").await.len(), 2);
    }
}
