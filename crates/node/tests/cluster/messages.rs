//! The CRDT plane on real node processes: durability of acknowledged posts across kill -9,
//! resumable subscriptions, and the typed errors clients meet.

use std::collections::{BTreeMap, BTreeSet};

use palaver_proto::v1::chat_service_client::ChatServiceClient;
use palaver_proto::v1::{
    AckLevel, CreateRoomRequest, EditRequest, HistoryRequest, MessageEventKind, MessageRequest, ReactRequest,
    RoomEvent, RoomRequest, SubscribeRequest, VersionVector, room_event,
};
use tonic::transport::Channel;

use crate::harness::{TestCluster, authed, code, next_event, next_or_end, post, user, wait_for};

async fn history(
    client: &mut ChatServiceClient<Channel>,
    token: &str,
    room: &str,
) -> Result<Vec<String>, tonic::Status> {
    let request = HistoryRequest { room: room.into(), limit: 500, oldest_first: true, ..Default::default() };
    let page = client.history(authed(request, token)).await?.into_inner();
    Ok(page.messages.into_iter().map(|m| m.message_id).collect())
}

async fn room_with(cluster: &TestCluster, room: &str) -> String {
    let mut client = cluster.chat(0);
    let ada = user(&mut client, "ada").await;
    client
        .create_room(authed(CreateRoomRequest { room: room.into(), ..Default::default() }, &ada))
        .await
        .expect("create room");
    ada
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_acknowledged_posts_survive_kill_9_of_the_accepting_replica() {
    let mut cluster = TestCluster::start(3, 2, &[]).await;
    let ada = room_with(&cluster, "durable").await;
    let mut client = cluster.chat(0);
    let mut acknowledged = Vec::new();
    for i in 0..20 {
        acknowledged.push(post(&mut client, &ada, "durable", &format!("m{i}"), AckLevel::Quorum).await.expect("post"));
    }
    cluster.kill(0).await;
    for i in 1..3 {
        let got = wait_for("the survivors to hold every acknowledged post", || async {
            let got = history(&mut cluster.chat(i), &ada, "durable").await.ok()?;
            (got.len() == acknowledged.len()).then_some(got)
        })
        .await;
        assert_eq!(got, acknowledged, "node {} holds them in posting order", i + 1);
    }
    cluster.restart(0).await;
    let got = wait_for("the restarted replica to serve history", || async {
        history(&mut cluster.chat(0), &ada, "durable").await.ok()
    })
    .await;
    assert_eq!(got, acknowledged, "the accepting replica kept everything it acknowledged");
    // Its posts now carry a replica id of its new life: the dots of the life before, some of
    // which a crash could have lost after peers and subscribers saw them, are never reused.
    let replica_of = |history: Vec<palaver_proto::v1::Message>, body: &str| {
        history.iter().find(|m| m.body == body).and_then(|m| m.position.as_ref()).map(|p| p.replica)
    };
    post(&mut cluster.chat(0), &ada, "durable", "after", AckLevel::Quorum).await.expect("post after restart");
    let request = HistoryRequest { room: "durable".into(), limit: 500, oldest_first: true, ..Default::default() };
    let messages = cluster.chat(0).history(authed(request.clone(), &ada)).await.expect("history").into_inner().messages;
    let (before, after) = (replica_of(messages.clone(), "m0"), replica_of(messages, "after"));
    assert!(before.is_some() && after.is_some(), "{before:?} {after:?}");
    assert_ne!(before, after, "a new life, a new replica id");
    assert_eq!(before.map(|r| r >> 32), after.map(|r| r >> 32), "of the same node");
    // A clean stop ends the life with every dot it issued durable: the next start goes on
    // under the same id, so version vectors do not grow with every restart.
    cluster.stop(0).await;
    cluster.restart(0).await;
    wait_for("the restarted replica to take posts", || async {
        post(&mut cluster.chat(0), &ada, "durable", "again", AckLevel::Quorum).await.ok()
    })
    .await;
    let messages = cluster.chat(0).history(authed(request, &ada)).await.expect("history").into_inner().messages;
    assert_eq!(replica_of(messages, "again"), after, "the life went on after a clean stop");
}

/// Read events from `stream` until a `caught_up` marker, recording each message event's dot.
async fn read_until_caught_up(
    stream: &mut tonic::Streaming<RoomEvent>,
    dots: &mut BTreeSet<(u64, u64)>,
    version_vector: &mut BTreeMap<u64, u64>,
) -> Vec<(MessageEventKind, String)> {
    let mut seen = Vec::new();
    loop {
        let event = next_event(stream).await;
        match event.event.expect("event set") {
            room_event::Event::Message(message) => {
                let position = message.position.expect("position");
                assert!(dots.insert((position.replica, position.counter)), "event {position:?} delivered twice");
                let held = version_vector.entry(position.replica).or_default();
                assert_eq!(position.counter, *held + 1, "each replica's events arrive in order, without gaps");
                *held = position.counter;
                let kind = MessageEventKind::try_from(message.kind).expect("known kind");
                seen.push((kind, message.message_id));
            }
            room_event::Event::CaughtUp(vv) => {
                assert_eq!(vv.entries.into_iter().collect::<BTreeMap<_, _>>(), *version_vector);
                return seen;
            }
            room_event::Event::Membership(_) | room_event::Event::State(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_resumes_on_another_node_and_gets_each_missed_event_once() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let ada = room_with(&cluster, "resume").await;
    let (mut first, mut second) = (cluster.chat(0), cluster.chat(1));
    let mut before = Vec::new();
    for i in 0..5 {
        before.push(post(&mut second, &ada, "resume", &format!("old-{i}"), AckLevel::Quorum).await.expect("post"));
    }
    // A quorum ack means two replicas hold a post: wait until the first node's does too, since
    // a subscription's catch-up sends what its node may show (history may already show an
    // event of its own that is still being fsynced there).
    wait_for("the first node to hold the posts", || {
        let (mut first, ada) = (first.clone(), ada.clone());
        async move {
            (history(&mut first, &ada, "resume").await.ok()?.len() == 5).then_some(())?;
            let request = SubscribeRequest { room: "resume".into(), version_vector: None };
            let mut stream = first.subscribe(authed(request, &ada)).await.ok()?.into_inner();
            let caught_up = read_until_caught_up(&mut stream, &mut BTreeSet::new(), &mut BTreeMap::new()).await;
            (caught_up.len() == 5).then_some(())
        }
    })
    .await;
    let mut dots = BTreeSet::new();
    let mut version_vector = BTreeMap::new();
    let request = SubscribeRequest { room: "resume".into(), version_vector: None };
    let mut stream = first.subscribe(authed(request, &ada)).await.expect("subscribe").into_inner();
    let got = read_until_caught_up(&mut stream, &mut dots, &mut version_vector).await;
    let posted: BTreeSet<String> = got.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(posted, before.iter().cloned().collect(), "a fresh subscriber gets the whole room");
    drop(stream);

    // While away: new posts on two nodes, an edit and a reaction.
    let mut after = Vec::new();
    for i in 0..5 {
        let client = if i % 2 == 0 { &mut first } else { &mut second };
        after.push(post(client, &ada, "resume", &format!("new-{i}"), AckLevel::Quorum).await.expect("post"));
    }
    let edit = EditRequest {
        room: "resume".into(),
        message_id: before[0].clone(),
        body: "old-0, edited".into(),
        ack: AckLevel::Quorum as i32,
    };
    first.edit(authed(edit, &ada)).await.expect("edit");
    let react = ReactRequest {
        room: "resume".into(),
        message_id: after[0].clone(),
        reaction: "+1".into(),
        remove: false,
        ack: AckLevel::Quorum as i32,
    };
    second.react(authed(react, &ada)).await.expect("react");

    // Resume on the third node with the version vector held.
    let mut third = cluster.chat(2);
    let resume = VersionVector { entries: version_vector.clone().into_iter().collect() };
    let request = SubscribeRequest { room: "resume".into(), version_vector: Some(resume) };
    let mut stream = third.subscribe(authed(request, &ada)).await.expect("resubscribe").into_inner();
    let got = wait_for_all(&mut stream, &mut dots, &mut version_vector, 7).await;
    let posts: BTreeSet<String> =
        got.iter().filter(|(kind, _)| *kind == MessageEventKind::Posted).map(|(_, id)| id.clone()).collect();
    assert_eq!(posts, after.iter().cloned().collect(), "exactly the missed posts, none of the earlier ones");
    assert!(got.contains(&(MessageEventKind::Edited, before[0].clone())), "the edit: {got:?}");
    assert!(got.contains(&(MessageEventKind::Reacted, after[0].clone())), "the reaction: {got:?}");

    // And then live.
    let live = post(&mut first, &ada, "resume", "live", AckLevel::Quorum).await.expect("post");
    loop {
        let event = next_event(&mut stream).await;
        if let Some(room_event::Event::Message(message)) = event.event {
            assert_eq!(message.message_id, live);
            assert_eq!(message.message.expect("the message").body, "live");
            break;
        }
    }
}

/// Read until `count` message events arrived (a resumed stream may catch up in more than one
/// step while replication lands), each exactly once.
async fn wait_for_all(
    stream: &mut tonic::Streaming<RoomEvent>,
    dots: &mut BTreeSet<(u64, u64)>,
    version_vector: &mut BTreeMap<u64, u64>,
    count: usize,
) -> Vec<(MessageEventKind, String)> {
    let mut got = read_until_caught_up(stream, dots, version_vector).await;
    while got.len() < count {
        let event = next_event(stream).await;
        if let Some(room_event::Event::Message(message)) = event.event {
            let position = message.position.expect("position");
            assert!(dots.insert((position.replica, position.counter)), "event {position:?} delivered twice");
            let held = version_vector.entry(position.replica).or_default();
            assert_eq!(position.counter, *held + 1);
            *held = position.counter;
            got.push((MessageEventKind::try_from(message.kind).expect("kind"), message.message_id));
        }
    }
    assert_eq!(got.len(), count, "nothing extra: {got:?}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_members_bad_input_and_floods_get_typed_errors() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let ada = room_with(&cluster, "guarded").await;
    let mut client = cluster.chat(1);
    let eve = user(&mut client, "eve").await;
    let mia = user(&mut client, "mia").await;
    client.join(authed(RoomRequest { room: "guarded".into() }, &mia)).await.expect("mia joins");
    let first = post(&mut client, &ada, "guarded", "hello", AckLevel::Quorum).await.expect("post");

    let not_member = post(&mut client, &eve, "guarded", "let me in", AckLevel::Quorum).await.expect_err("eve");
    assert_eq!(code(&not_member), "not_member");
    assert_eq!(code(&history(&mut client, &eve, "guarded").await.expect_err("eve reads")), "not_member");
    let subscribe = client
        .subscribe(authed(SubscribeRequest { room: "guarded".into(), version_vector: None }, &eve))
        .await
        .expect_err("eve subscribes");
    assert_eq!(code(&subscribe), "not_member");
    let nowhere = post(&mut client, &ada, "nowhere", "hi", AckLevel::Quorum).await.expect_err("no room");
    assert_eq!(code(&nowhere), "room_not_found");

    let too_big =
        post(&mut client, &ada, "guarded", &"x".repeat(16 * 1024 + 1), AckLevel::Quorum).await.expect_err("big");
    assert_eq!(code(&too_big), "invalid_input");
    let empty = post(&mut client, &ada, "guarded", "", AckLevel::Quorum).await.expect_err("empty");
    assert_eq!(code(&empty), "invalid_input");
    let edit = |message_id: &str, body: &str| EditRequest {
        room: "guarded".into(),
        message_id: message_id.into(),
        body: body.into(),
        ack: AckLevel::Quorum as i32,
    };
    let malformed = client.edit(authed(edit("zz", "x"), &ada)).await.expect_err("bad id");
    assert_eq!(code(&malformed), "invalid_input");
    let unknown = client.edit(authed(edit(&"0".repeat(32), "x"), &ada)).await.expect_err("unknown id");
    assert_eq!(code(&unknown), "message_not_found");
    let not_hers = client.edit(authed(edit(&first, "mine now"), &mia)).await.expect_err("mia edits ada's");
    assert_eq!(code(&not_hers), "permission_denied");

    // A flood: the burst passes, then typed refusals that say how long to wait.
    let mut limited = None;
    for i in 0..100 {
        if let Err(status) = post(&mut client, &mia, "guarded", &format!("flood-{i}"), AckLevel::One).await {
            limited = Some(status);
            break;
        }
    }
    let limited = limited.expect("the flood hits the rate limit");
    assert_eq!(code(&limited), "rate_limited");
    let wait_ms: u64 = limited
        .metadata()
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after-ms metadata");
    assert!(wait_ms > 0);

    // The node keeps serving: another user is not limited, and mia is again after the wait.
    post(&mut client, &ada, "guarded", "still here", AckLevel::Quorum).await.expect("ada posts");
    wait_for("mia's bucket to refill", || async {
        post(&mut cluster.chat(1), &mia, "guarded", "after the wait", AckLevel::One).await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_presence_and_read_markers_reach_subscribers_on_other_nodes() {
    use palaver_proto::v1::{MarkReadRequest, PresenceStatus, SetPresenceRequest, TypingRequest};
    let cluster = TestCluster::start(3, 2, &[]).await;
    let ada = room_with(&cluster, "lively").await;
    let mut other = cluster.chat(2);
    let mia = user(&mut other, "mia").await;
    other.join(authed(RoomRequest { room: "lively".into() }, &mia)).await.expect("mia joins");
    let request = SubscribeRequest { room: "lively".into(), version_vector: None };
    let mut stream = cluster.chat(0).subscribe(authed(request, &ada)).await.expect("subscribe").into_inner();
    let posted = post(&mut cluster.chat(0), &ada, "lively", "anyone?", AckLevel::Quorum).await.expect("post");

    // mia, on another node: online, and she read ada's message.
    let presence = SetPresenceRequest { status: PresenceStatus::Online as i32, rooms: vec!["lively".into()] };
    other.set_presence(authed(presence, &mia)).await.expect("presence");
    // A quorum ack is durable on two replicas: node 3 may be the one still receiving it.
    let page = wait_for("node 3 to hold ada's post", || {
        let (mut other, mia) = (other.clone(), mia.clone());
        async move { history(&mut other, &mia, "lively").await.ok().filter(|page| !page.is_empty()) }
    })
    .await;
    assert_eq!(page, vec![posted]);
    let full = other
        .history(authed(HistoryRequest { room: "lively".into(), limit: 1, ..Default::default() }, &mia))
        .await
        .expect("history")
        .into_inner();
    let position = full.messages[0].position;
    let unread = |rooms: palaver_proto::v1::ListRoomsResponse| {
        rooms.rooms.into_iter().find(|r| r.room == "lively").map(|r| r.unread_count)
    };
    let listed = other.list_rooms(authed(palaver_proto::v1::ListRoomsRequest {}, &mia)).await.expect("list");
    assert_eq!(unread(listed.into_inner()), Some(1), "ada's message is unread for mia");
    other.mark_read(authed(MarkReadRequest { room: "lively".into(), position }, &mia)).await.expect("mark read");
    let listed = other.list_rooms(authed(palaver_proto::v1::ListRoomsRequest {}, &mia)).await.expect("list");
    assert_eq!(unread(listed.into_inner()), Some(0), "read now");

    let mut seen_online = false;
    let mut seen_marker = false;
    while !(seen_online && seen_marker) {
        let event = next_event(&mut stream).await;
        if let Some(room_event::Event::State(state)) = event.event {
            seen_online |= state.presence.get("mia") == Some(&(PresenceStatus::Online as i32));
            seen_marker |= state.read_markers.contains_key("mia");
        }
    }
    // Typing alone (no other change of the room's side state) reaches the other node too, and
    // so does its end.
    for typing in [true, false] {
        other.typing(authed(TypingRequest { room: "lively".into(), typing }, &mia)).await.expect("typing");
        loop {
            let event = next_event(&mut stream).await;
            if let Some(room_event::Event::State(state)) = event.event
                && state.typing.contains(&"mia".to_string()) == typing
            {
                break;
            }
        }
    }
}

/// The messages of `room` as node `i` shows them to `token`'s user, oldest first.
async fn messages_on(
    cluster: &TestCluster,
    i: usize,
    token: &str,
    room: &str,
) -> Result<Vec<palaver_proto::v1::Message>, tonic::Status> {
    let request = HistoryRequest { room: room.into(), limit: 500, oldest_first: true, ..Default::default() };
    Ok(cluster.chat(i).history(authed(request, token)).await?.into_inner().messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redactions_and_taken_back_reactions_reach_every_replica_and_a_kicked_subscriber_is_ended() {
    let cluster = TestCluster::start(3, 2, &[]).await;
    let ada = room_with(&cluster, "mod").await;
    let mut bo_client = cluster.chat(1);
    let bo = user(&mut bo_client, "bo").await;
    bo_client.join(authed(RoomRequest { room: "mod".into() }, &bo)).await.expect("bo joins");
    let spam = post(&mut bo_client, &bo, "mod", "buy now", AckLevel::Quorum).await.expect("post");
    let kept = post(&mut bo_client, &bo, "mod", "hello", AckLevel::Quorum).await.expect("post");
    let react = |message_id: &str, remove: bool| ReactRequest {
        room: "mod".into(),
        message_id: message_id.into(),
        reaction: "+1".into(),
        remove,
        ack: AckLevel::Quorum as i32,
    };
    bo_client.react(authed(react(&kept, false), &bo)).await.expect("react");
    bo_client.react(authed(react(&spam, false), &bo)).await.expect("react");
    bo_client.react(authed(react(&spam, true), &bo)).await.expect("take the reaction back");
    // A member may not redact another's message; the owner may.
    let mut ada_client = cluster.chat(2);
    let redact = MessageRequest { room: "mod".into(), message_id: kept.clone(), ack: AckLevel::Quorum as i32 };
    let mut cy_client = cluster.chat(0);
    let cy = user(&mut cy_client, "cy").await;
    cy_client.join(authed(RoomRequest { room: "mod".into() }, &cy)).await.expect("cy joins");
    let refused = cy_client.redact(authed(redact, &cy)).await.expect_err("not cy's message, cy has no rank");
    assert_eq!(code(&refused), "permission_denied", "{refused:?}");
    let redact = MessageRequest { room: "mod".into(), message_id: spam.clone(), ack: AckLevel::Quorum as i32 };
    ada_client.redact(authed(redact, &ada)).await.expect("the owner redacts");

    // Every replica converges on: the spam redacted (skeleton kept, body gone, no reactions),
    // the other message intact with bo's reaction.
    for i in 0..3 {
        wait_for("the replica to show the redaction and the reactions", || async {
            let messages = messages_on(&cluster, i, &ada, "mod").await.ok()?;
            let [first, second] = messages.as_slice() else { return None };
            let done = first.message_id == spam
                && first.redacted
                && first.body.is_empty()
                && first.reactions.is_empty()
                && second.message_id == kept
                && !second.redacted
                && second.body == "hello"
                && second.reactions.len() == 1
                && second.reactions[0].users == vec!["bo".to_string()];
            done.then_some(())
        })
        .await;
    }

    // Bo subscribes; when ada kicks bo, bo's stream shows the kick and then ends `not_member`.
    let mut stream = bo_client
        .subscribe(authed(SubscribeRequest { room: "mod".into(), ..Default::default() }, &bo))
        .await
        .expect("subscribe")
        .into_inner();
    let mut dots = BTreeSet::new();
    let mut version_vector = BTreeMap::new();
    read_until_caught_up(&mut stream, &mut dots, &mut version_vector).await;
    ada_client
        .kick(authed(palaver_proto::v1::TargetRequest { room: "mod".into(), user: "bo".into() }, &ada))
        .await
        .expect("kick");
    let mut saw_kick = false;
    let end = loop {
        match next_or_end(&mut stream).await {
            Ok(Some(RoomEvent { event: Some(room_event::Event::Membership(m)), .. })) => {
                saw_kick |= m.user == "bo" && m.change == "kicked" && m.actor == "ada";
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without saying why"),
            Err(status) => break status,
        }
    };
    assert!(saw_kick, "the kick is the last event bo sees");
    assert_eq!(code(&end), "not_member", "{end:?}");
    let refused = messages_on(&cluster, 1, &bo, "mod").await.expect_err("bo can no longer read");
    assert_eq!(code(&refused), "not_member", "{refused:?}");
}
