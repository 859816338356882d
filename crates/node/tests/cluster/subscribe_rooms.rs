//! `ChatService.SubscribeRooms`: many rooms on one stream, each subscription as a `Subscribe`
//! of its own, ended on its own.

use std::collections::{BTreeMap, BTreeSet};

use palaver_proto::v1::{
    AckLevel, CreateRoomRequest, MessageEventKind, PipelineError, RoomRequest, RoomSubscription, SubscribeRoomsReply,
    SubscribeRoomsRequest, VersionVector, room_event, room_subscription_event,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::harness::{TestCluster, WAIT_DEADLINE, authed, code, post, user};

/// What a client of a `SubscribeRooms` stream holds, per subscription id.
#[derive(Debug, Default)]
pub struct Held {
    /// Version vector per id.
    pub vectors: BTreeMap<u64, BTreeMap<u64, u64>>,
    /// Bodies of posted messages per id, in arrival order.
    pub bodies: BTreeMap<u64, Vec<String>>,
    /// `caught_up` markers per id.
    pub caught_up: BTreeMap<u64, usize>,
    /// Ends per id.
    pub ended: BTreeMap<u64, PipelineError>,
    /// Ids the client stopped: their events still in flight are dropped, as a client must
    /// (a stop is not acknowledged, so the client resumes under a new id).
    pub stopped: BTreeSet<u64>,
}

impl Held {
    /// Take in one reply, checking that each replica's events come once, in order, without gaps.
    pub fn take(&mut self, reply: SubscribeRoomsReply) {
        for event in reply.events {
            if self.stopped.contains(&event.id) {
                continue;
            }
            match event.body.expect("body set") {
                room_subscription_event::Body::End(end) => {
                    assert!(self.ended.insert(event.id, end).is_none(), "subscription {} ended twice", event.id);
                }
                room_subscription_event::Body::Event(room_event) => match room_event.event.expect("event set") {
                    room_event::Event::Message(message) => {
                        let position = message.position.expect("position");
                        let held = self.vectors.entry(event.id).or_default().entry(position.replica).or_default();
                        assert_eq!(position.counter, *held + 1, "subscription {}: gapless, once each", event.id);
                        *held = position.counter;
                        if message.kind == MessageEventKind::Posted as i32 {
                            let body = message.message.expect("posted message").body;
                            self.bodies.entry(event.id).or_default().push(body);
                        }
                    }
                    room_event::Event::CaughtUp(_) => *self.caught_up.entry(event.id).or_default() += 1,
                    room_event::Event::Membership(_) | room_event::Event::State(_) => {}
                },
            }
        }
    }

    /// Stop taking subscription `stopped` (of `room`) and start it again as `id`, from what
    /// the client holds; what `id` then receives counts as `stopped`'s.
    pub fn resume(&mut self, stopped: u64, id: u64, room: &str) -> RoomSubscription {
        self.stopped.insert(stopped);
        let vector = self.vectors.get(&stopped).cloned().unwrap_or_default();
        let entries = vector.iter().map(|(r, c)| (*r, *c)).collect();
        self.vectors.insert(id, vector);
        if let Some(bodies) = self.bodies.get(&stopped).cloned() {
            self.bodies.insert(id, bodies);
        }
        RoomSubscription { id, room: room.into(), version_vector: Some(VersionVector { entries }) }
    }

    /// Read `stream` until `done` holds, or fail after the deadline.
    pub async fn read_until(
        &mut self,
        stream: &mut tonic::Streaming<SubscribeRoomsReply>,
        what: &str,
        done: impl Fn(&Held) -> bool,
    ) {
        while !done(self) {
            let reply = tokio::time::timeout(WAIT_DEADLINE, stream.message())
                .await
                .unwrap_or_else(|_| panic!("waiting for {what}: {self:?}"))
                .expect("stream healthy")
                .expect("stream open");
            self.take(reply);
        }
    }

    /// The posted bodies of subscription `id`, sorted.
    pub fn sorted(&self, id: u64) -> Vec<String> {
        let mut bodies = self.bodies.get(&id).cloned().unwrap_or_default();
        bodies.sort();
        bodies
    }
}

fn start(subscriptions: Vec<RoomSubscription>) -> SubscribeRoomsRequest {
    SubscribeRoomsRequest { start: subscriptions, stop: Vec::new() }
}

fn fresh(id: u64, room: &str) -> RoomSubscription {
    RoomSubscription { id, room: room.into(), version_vector: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_rooms_share_one_stream_and_each_subscription_ends_and_resumes_on_its_own() {
    let cluster = TestCluster::start(3, 4, &[]).await;
    let mut first = cluster.chat(0);
    let ada = user(&mut first, "ada").await;
    let bo = user(&mut first, "bo").await;
    for (room, owner) in [("north", &ada), ("south", &ada), ("walled", &bo)] {
        first
            .create_room(authed(CreateRoomRequest { room: room.into(), ..Default::default() }, owner))
            .await
            .expect("create");
    }
    first.join(authed(RoomRequest { room: "north".into() }, &bo)).await.expect("join");
    let before: Vec<String> = (0..3).map(|i| format!("north-old-{i}")).collect();
    for body in &before {
        post(&mut first, &ada, "north", body, AckLevel::Quorum).await.expect("post");
    }

    // Ada subscribes on the second node: two rooms she is in, one she is not, one bad name.
    let mut second = cluster.chat(1);
    let (control, requests) = mpsc::channel(8);
    control
        .send(start(vec![fresh(1, "north"), fresh(2, "south"), fresh(3, "walled"), fresh(4, "")]))
        .await
        .expect("send");
    let mut stream =
        second.subscribe_rooms(authed(ReceiverStream::new(requests), &ada)).await.expect("opens").into_inner();
    let mut held = Held::default();
    held.read_until(&mut stream, "both rooms caught up and both refusals", |held| {
        held.caught_up.contains_key(&1) && held.caught_up.contains_key(&2) && held.ended.len() == 2
    })
    .await;
    assert_eq!(held.ended[&3].code, "not_member", "{:?}", held.ended[&3]);
    assert_eq!(held.ended[&4].code, "invalid_input", "{:?}", held.ended[&4]);
    assert!(!held.ended.contains_key(&1) && !held.ended.contains_key(&2), "the others go on: {held:?}");
    // The sent quorum posts are on two replicas; the second node shows what it holds, and the
    // rest comes live.
    held.read_until(&mut stream, "the old posts", |held| held.sorted(1) == before).await;

    // Live: posts through another node reach each subscription under its own id.
    for i in 0..3 {
        post(&mut first, &bo, "north", &format!("north-{i}"), AckLevel::Quorum).await.expect("post");
        post(&mut first, &ada, "south", &format!("south-{i}"), AckLevel::Quorum).await.expect("post");
    }
    held.read_until(&mut stream, "the live posts", |held| held.sorted(1).len() == 6 && held.sorted(2).len() == 3).await;
    assert_eq!(held.sorted(2), ["south-0", "south-1", "south-2"]);

    // Stop north; what is posted meanwhile comes when it resumes (as id 5) from its version
    // vector, once. Events of id 1 may still arrive after the stop: dropped, then sent again
    // under id 5.
    control.send(SubscribeRoomsRequest { start: Vec::new(), stop: vec![1] }).await.expect("send");
    for i in 3..5 {
        post(&mut first, &bo, "north", &format!("north-{i}"), AckLevel::Quorum).await.expect("post");
    }
    control.send(start(vec![held.resume(1, 5, "north")])).await.expect("send");
    post(&mut first, &ada, "south", "south-3", AckLevel::Quorum).await.expect("post");
    held.read_until(&mut stream, "north resumed", |held| held.sorted(5).len() == 8 && held.sorted(2).len() == 4).await;
    let mut north: Vec<String> = before.clone();
    north.extend((0..5).map(|i| format!("north-{i}")));
    north.sort();
    assert_eq!(held.sorted(5), north, "every north post once, none twice");

    // Deleting south ends its subscription alone.
    first.delete_room(authed(RoomRequest { room: "south".into() }, &ada)).await.expect("delete");
    held.read_until(&mut stream, "south ended", |held| held.ended.contains_key(&2)).await;
    assert_eq!(held.ended[&2].code, "not_member", "{:?}", held.ended[&2]);
    post(&mut first, &bo, "north", "north-5", AckLevel::Quorum).await.expect("post");
    held.read_until(&mut stream, "north still live", |held| held.sorted(5).len() == 9).await;

    // A stream runs at most SUBSCRIBE_ROOMS_PER_STREAM_MAX subscriptions; one more is refused
    // alone.
    let max = palaver_node::subscribe_rooms::SUBSCRIBE_ROOMS_PER_STREAM_MAX as u64;
    let (control, requests) = mpsc::channel(1);
    control.send(start((1..=max + 1).map(|id| fresh(id, "north")).collect())).await.expect("send");
    let mut crowded =
        second.subscribe_rooms(authed(ReceiverStream::new(requests), &ada)).await.expect("opens").into_inner();
    let mut many = Held::default();
    many.read_until(&mut crowded, "every subscription caught up, one refused", |held| {
        held.caught_up.len() == max as usize && held.ended.len() == 1
    })
    .await;
    assert_eq!(many.ended[&(max + 1)].code, "limit_reached", "{:?}", many.ended);

    // No token, no stream.
    let (_control, requests) = mpsc::channel::<SubscribeRoomsRequest>(1);
    let refused = cluster.chat(2).subscribe_rooms(ReceiverStream::new(requests)).await.expect_err("no token");
    assert_eq!(code(&refused), "unauthenticated");
}
