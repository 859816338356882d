//! `ChatService.Pipeline`: many writes on one stream, answered by id, with the same rules and
//! errors as the unary calls.

use std::collections::BTreeMap;

use palaver_proto::v1::{
    AckLevel, CreateRoomRequest, HistoryRequest, PipelineReply, PipelineRequest, PostRequest, RoomRequest,
    TargetRequest, pipeline_reply, pipeline_request,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{TestCluster, authed, code, user};

fn post(room: &str, body: &str) -> pipeline_request::Op {
    pipeline_request::Op::Post(PostRequest {
        room: room.into(),
        body: body.into(),
        client_message_id: format!("cid-{body}"),
        ack: AckLevel::Quorum as i32,
        seen: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_runs_many_writes_and_answers_each_by_id() {
    let cluster = TestCluster::start(3, 4, &[]).await;
    let mut owner_client = cluster.chat(0);
    let ada = user(&mut owner_client, "ada").await;
    owner_client
        .create_room(authed(CreateRoomRequest { room: "piped".into(), ..Default::default() }, &ada))
        .await
        .expect("create");
    // Bo writes through node 2 (which may or may not lead the room's shard).
    let mut client = cluster.chat(1);
    let bo = user(&mut client, "bo").await;
    let (requests, outgoing) = mpsc::channel(64);
    let mut replies =
        client.pipeline(authed(ReceiverStream::new(outgoing), &bo)).await.expect("pipeline opens").into_inner();

    // Join first and wait for it: the posts depend on the membership.
    requests.send(PipelineRequest { id: 1, op: Some(pipeline_request::Op::Join(room("piped"))) }).await.expect("send");
    let joined: PipelineReply = replies.message().await.expect("stream").expect("a reply");
    assert_eq!(joined.id, 1);
    assert!(matches!(joined.result, Some(pipeline_reply::Result::Ack(_))), "join: {joined:?}");

    // Then many at once, including refusals, which come back as replies, not as the end of
    // the stream.
    let mut sent = BTreeMap::new();
    for i in 0..40u64 {
        sent.insert(100 + i, format!("m{i}"));
        requests.send(PipelineRequest { id: 100 + i, op: Some(post("piped", &format!("m{i}"))) }).await.expect("send");
    }
    let kick = pipeline_request::Op::Kick(TargetRequest { room: "piped".into(), user: "ada".into() });
    requests.send(PipelineRequest { id: 7, op: Some(kick) }).await.expect("send");
    requests.send(PipelineRequest { id: 8, op: None }).await.expect("send");
    requests.send(PipelineRequest { id: 9, op: Some(post("nowhere", "lost")) }).await.expect("send");

    let mut answered = BTreeMap::new();
    while answered.len() < sent.len() + 3 {
        let reply = replies.message().await.expect("stream").expect("a reply");
        assert!(answered.insert(reply.id, reply.result).is_none(), "answered twice: {}", reply.id);
    }
    for id in sent.keys() {
        assert!(matches!(answered[id], Some(pipeline_reply::Result::Post(_))), "post {id}: {:?}", answered[id]);
    }
    let error_code = |id: u64| match &answered[&id] {
        Some(pipeline_reply::Result::Error(e)) => {
            assert!(!e.message.is_empty());
            e.code.clone()
        }
        other => panic!("request {id} should have failed: {other:?}"),
    };
    assert_eq!(error_code(7), "permission_denied");
    assert_eq!(error_code(8), "invalid_input");
    assert_eq!(error_code(9), "room_not_found");

    // Every acknowledged post is in the history of the replica that accepted it, once.
    let page = client
        .history(authed(
            HistoryRequest { room: "piped".into(), limit: 100, oldest_first: true, ..Default::default() },
            &bo,
        ))
        .await
        .expect("history")
        .into_inner();
    let mut bodies: Vec<String> = page.messages.into_iter().map(|m| m.body).collect();
    bodies.sort();
    let mut expected: Vec<String> = sent.into_values().collect();
    expected.sort();
    assert_eq!(bodies, expected);

    // No token, no stream.
    let (_requests, outgoing) = mpsc::channel::<PipelineRequest>(1);
    let refused = cluster.chat(2).pipeline(ReceiverStream::new(outgoing)).await.expect_err("no token");
    assert_eq!(code(&refused), "unauthenticated");
}

fn room(name: &str) -> RoomRequest {
    RoomRequest { room: name.into() }
}
